"""The maintenance timer: one daemon thread per process for all its pools.

Stock Odoo only sweeps idle connections inside ``borrow()``, so a worker that
stops receiving requests keeps its connections for ever (10 minutes in 17+).
Here a daemon thread calls ``pool.upkeep.maintain()`` every ``timer_period`` seconds.
It is started lazily by the first borrow of each process (threads do not
survive ``fork()``, and Odoo's prefork workers are forked), and under gevent
the monkey-patched ``threading`` makes it a greenlet, which is what we want.
"""
import logging
import os
import threading
import time
import weakref

from .. import after_fork
from ..shared.doorbell import can_sleep

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


_last_failure_log = [0.0]


def _log_failure(message, *args):
    """Log a maintenance failure with its traceback, at most once a minute."""
    now = time.monotonic()
    if now - _last_failure_log[0] >= 60:
        _last_failure_log[0] = now
        _logger.exception(message, *args)


SHED_TICK = 0.02    # seconds between wake-ups of a shared-budget process's thread
# Seconds between its passes when none is urgent (see _urgent). Under the web client's
# load on Odoo 18 (8 workers, docs/benchmarks.rst) the maintenance threads used 300-470 µs
# of CPU per request at 0.1 s (a pass wakes a thread that must take the GIL from the
# worker's): what a pass does (figures, reaping, the parking's tick) can be that old.
IDLE_TICK = 0.25


def _urgent(pools):
    """Whether a shared-budget process's pass is due at once: borrowers wait for the
    budget (idle connections are shed for them), or slots of closed connections wait
    for their backend to exit (closed pools' too). Lock-free reads.

    Otherwise a pass comes every IDLE_TICK: under the footprint benchmark a pass
    every SHED_TICK cost each worker a sixth of a short transaction's CPU (and the
    GIL meanwhile), and a timed wake-up every SHED_TICK just to ask a third of that.
    So the thread sleeps on the instance's doorbell (see :mod:`.doorbell`), which a
    borrower that starts waiting rings; where there is none it wakes every SHED_TICK
    to ask. A connection closed while the thread sleeps is seen at the next pass
    (its slot is freed at most IDLE_TICK later; a borrower short of a slot of the
    shared budget rings, one short of its own pool's slots waits for that pass)."""
    for pool in pools:
        if pool.exits_pending():
            return True
        budget = pool.budget
        if budget is not None:
            if budget.waiting():
                return True
            parking = budget.exchange.parking if budget.exchange is not None else None
            if parking is not None and parking.exits_pending():
                return True
    return False


def _doorbell(shared):
    """The doorbell the thread may sleep on: that of the one shared state of the
    process's shared-budget pools (None with several, or none usable)."""
    states = {id(pool.budget.state): pool.budget.state for pool in shared}
    if len(states) != 1 or not can_sleep():
        return None
    return next(iter(states.values())).doorbell()


def _run(wake):
    my_pid = os.getpid()
    last_full = last_pass = float('-inf')
    while _state['pid'] == my_pid:
        every = list(_pools)
        pools = [pool for pool in every if not pool.closed]
        period = min((pool.timer_period for pool in pools), default=1.0)
        shared = [pool for pool in pools if pool.budget is not None]
        now = time.monotonic()
        bell = _doorbell(shared) if shared else None
        due = last_pass + min(period, IDLE_TICK)
        if shared and now < due:
            seen = bell.value() if bell is not None else 0  # before the check: no ring lost
            if not _urgent(every):
                del every, pools, shared
                if bell is not None:
                    bell.sleep(seen, due - now)
                else:
                    wake.wait(min(period, SHED_TICK))
                    wake.clear()
                continue
        for pool in every:
            if pool.closed and pool.exits_pending():
                # shut down: its closed connections' slots are freed once their backends exit
                try:
                    pool.books.finish_exits()
                except Exception:
                    _log_failure('db_pooling maintenance of %r failed; will retry', pool)
        # Measured from the last pass with the pools of now: a pool registered with a
        # shorter period is served at its own pace, not after the longer one's.
        full = now - last_full >= period
        if full:
            last_full = now
        for pool in pools:
            try:
                if full:
                    pool.upkeep.maintain()
                pool.books.finish_exits()
                if pool.budget is not None:
                    pool.upkeep.shed_idle()
            except Exception:
                _log_failure('db_pooling maintenance of %r failed; will retry', pool)
        for budget, settings in {id(pool.budget): (pool.budget, pool.settings)
                                 for pool in shared}.values():
            parking = budget.exchange.parking if budget.exchange is not None else None
            if parking is not None:
                try:
                    parking.tick(full, settings.idle_timeout)
                except Exception:
                    _log_failure('db_pooling maintenance of the parked connections failed; '
                                 'will retry')
        if shared:
            try:
                _publish(shared)
            except Exception:
                _log_failure('db_pooling could not publish to the shared state; will retry')
        last_pass = time.monotonic()
        if not shared:
            pause = period
        elif bell is None or _urgent(every):
            pause = min(period, SHED_TICK)
        else:
            pause = 0       # the top of the loop sleeps on the doorbell until the next is due
        del every, pools, shared
        if pause:
            wake.wait(pause)
            wake.clear()


def _publish(pools):
    """Write this process's figures to the shared state; reap dead processes; sample history."""
    by_budget = {}
    for pool in pools:
        by_budget.setdefault(id(pool.budget), (pool.budget, []))[1].append(pool)
    for budget, members in by_budget.values():
        in_use = idle = long_lived = borrows = reused = opened = 0
        longest = min(filter(None, (pool.upkeep.longest_borrow() for pool in members)),
                      default=None)
        for pool in members:
            figures = pool.upkeep.figures()
            in_use += figures['in_use']
            idle += figures['idle']
            long_lived += figures['long_lived']
            borrows += pool.stats.borrows
            reused += pool.stats.reused
            opened += pool.stats.opened
        budget.publish(in_use, idle, long_lived, borrows=borrows, reused=reused, opened=opened)
        _publish_longest_borrow(budget, longest)
        if budget.reap():
            _logger.info('db_pooling reclaimed the budget slots of processes that died')
        budget.state.record_history()


_published = {}     # id(budget) -> (row, longest borrow) last published by this process


def _publish_longest_borrow(budget, longest):
    """Share this process's longest current borrow (the dashboard of any worker shows it)."""
    if _published.get(id(budget)) == (budget.row, longest):
        return
    _published[id(budget)] = (budget.row, longest)
    if longest is None:
        budget.state.publish_longest_borrow(budget.row, budget.pid)
    else:
        since, database, site = longest
        budget.state.publish_longest_borrow(budget.row, budget.pid, int(since * 1000) or 1,
                                            database, site)


def _after_fork_in_child():
    global _lock
    _lock = threading.Lock()
    _state['pid'] = None
    _pools.clear()
    _published.clear()


after_fork.register('maintenance', _after_fork_in_child)
