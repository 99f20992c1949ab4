"""The maintenance timer: one daemon thread per process for all its pools.

Stock Odoo only sweeps idle connections inside ``borrow()``, so a worker that
stops receiving requests keeps its connections for ever (10 minutes in 17+).
Here a daemon thread calls ``pool.maintain()`` every ``timer_period`` seconds.
It is started lazily by the first borrow of each process (threads do not
survive ``fork()``, and Odoo's prefork workers are forked), and under gevent
the monkey-patched ``threading`` makes it a greenlet, which is what we want.
"""
import logging
import os
import threading
import weakref

_logger = logging.getLogger('odoo.sql_db.pool')

_lock = threading.Lock()
_pools = weakref.WeakSet()
_state = {'pid': None, 'wake': None}


def start(pool):
    """Register ``pool`` with this process's maintenance thread, starting it if needed."""
    with _lock:
        _pools.add(pool)
        if _state['pid'] != os.getpid():
            _state['pid'] = os.getpid()
            _state['wake'] = threading.Event()
            thread = threading.Thread(target=_run, args=(_state['wake'],),
                                      name='db_pooling-maintenance', daemon=True)
            thread.start()
        _state['wake'].set()        # re-read the period of the new pool
    return True


def _run(wake):
    my_pid = os.getpid()
    while _state['pid'] == my_pid:
        pools = [pool for pool in list(_pools) if not pool._closed]
        period = min((pool.timer_period for pool in pools), default=1.0)
        for pool in pools:
            try:
                pool.maintain()
            except Exception:
                _logger.exception('db_pooling maintenance of %r failed; will retry', pool)
        del pools
        wake.wait(period)
        wake.clear()


def _after_fork_in_child():
    global _lock
    _lock = threading.Lock()
    _state['pid'] = None
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
