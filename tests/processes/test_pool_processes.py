"""The engine across fork() and under gevent, with real processes."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest


from odoo_pool_patch.config.options import Settings

from testkit import backend_pid

from testkit import ROOT



def test_forked_child_never_touches_parent_connections(pools, info, pg, app):
    pool = pools(4)
    held = pool.borrow(info())
    idle = pool.borrow(info())
    parent_pids = {backend_pid(held), backend_pid(idle)}
    pool.give_back(idle)
    child = os.fork()
    if child == 0:                                   # pragma: no cover - child process
        code = 1
        try:
            cnx = pool.borrow(info())
            ok = backend_pid(cnx) not in parent_pids and pool.snapshot()['idle'] == 0
            pool.give_back(cnx)
            # What garbage collection at the child's exit would do to its copies.
            held.close()
            idle.close()
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's sessions survived the child's exit and garbage collection.
    assert backend_pid(held) in parent_pids
    again = pool.borrow(info())
    assert again is idle and backend_pid(again) in parent_pids
    pool.give_back(held)
    pool.give_back(again)


GEVENT_SCRIPT = textwrap.dedent('''
    from gevent import monkey
    monkey.patch_all()
    import json, sys, gevent
    import psycopg2.extensions
    from gevent.socket import wait_read, wait_write
    sys.path.insert(0, sys.argv[2])
    from odoo_pool_patch.pool.connection_pool import ConnectionPool
    from odoo_pool_patch.config.options import Settings

    def wait_callback(conn, timeout=None):   # what psycogreen installs in Odoo's gevent process
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                wait_read(conn.fileno(), timeout=timeout)
            else:
                wait_write(conn.fileno(), timeout=timeout)
    psycopg2.extensions.set_wait_callback(wait_callback)

    info = json.loads(sys.argv[1])
    pool = ConnectionPool(2, settings=Settings(wait_timeout=30))
    state = {'held': 0, 'peak': 0, 'ticks': 0, 'done': 0, 'running': True}

    def ticker():
        while state['running']:
            state['ticks'] += 1
            gevent.sleep(0.01)

    def work():
        cnx = pool.borrow(info)
        state['held'] += 1
        state['peak'] = max(state['peak'], state['held'])
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_sleep(0.05)')
        cnx.rollback()
        state['held'] -= 1
        pool.give_back(cnx)
        state['done'] += 1

    tick = gevent.spawn(ticker)
    gevent.joinall([gevent.spawn(work) for _ in range(12)], raise_error=True)
    state['running'] = False
    tick.join()
    state['waits'] = pool.stats.waits
    print(json.dumps(state))
''')


def test_greenlets_wait_cooperatively_under_gevent(info, tmp_path):
    pytest.importorskip('gevent')
    script = tmp_path / 'gevent_pool.py'
    script.write_text(GEVENT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), json.dumps(info()), ROOT],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state['done'] == 12 and state['peak'] == 2
    assert state['waits'] >= 1
    # The hub kept running other greenlets while borrowers waited.
    assert state['ticks'] >= 10


def test_interrupted_waiter_leaves_queue_and_slot(pools, info):
    pool = pools(1, settings=Settings(wait_timeout=30))
    cnx = pool.borrow(info())

    class Interrupt(BaseException):
        pass

    # Interrupt a waiter from inside its wait, as gevent.Timeout would.
    original = threading.Condition.wait

    def interrupted_wait(self, timeout=None):
        raise Interrupt()
    threading.Condition.wait = interrupted_wait
    try:
        with pytest.raises(Interrupt):
            pool.borrow(info())
    finally:
        threading.Condition.wait = original
    assert pool.snapshot()['waiting'] == 0
    pool.give_back(cnx)
    assert pool.borrow(info()) is cnx             # the slot was not lost
    pool.give_back(cnx)
