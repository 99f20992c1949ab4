"""Processes in separate PID namespaces (containers sharing ``db_pool_shared_path``)
share one budget correctly: real processes started with ``unshare --pid --fork
--mount-proc`` (root only), real PostgreSQL, SIGKILL.

In its own namespace a process is pid 1 or so, and its start time there means
nothing here: judged through this namespace's ``/proc`` (the old liveness
check), its row looks dead and was reaped while it held slots. Rows are now
kept alive by a lock the kernel drops only when the process dies.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit import ROOT
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason='unshare --pid needs root'),
    pytest.mark.skipif(not shutil.which('unshare'), reason='unshare (util-linux) not installed'),
    pytest.mark.skipif(not ss.OFD_LOCKS, reason='needs open file description locks (Linux)'),
]


# A "container": a pool on the shared budget. ``hold N``: keep N connections borrowed;
# ``churn S``: borrow and give back for S seconds. Prints its pid in its namespace,
# then 'ready', then waits for a line on stdin (or runs the churn) and exits.
CHILD = r'''
import json, os, random, sys, time
sys.path.insert(0, sys.argv[1])
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool
path, budget, mode, amount, infos = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), \
    json.loads(sys.argv[6])
pool = ConnectionPool(8, settings=Settings(wait_timeout=30), budget=SharedBudget(
    ss.SharedState(path), budget, role='http'))
print(os.getpid(), flush=True)
if mode == 'hold':
    held = [pool.borrow(infos[i % len(infos)]) for i in range(int(amount))]
    for cnx in held:
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')
    print('ready', flush=True)
    sys.stdin.readline()
else:
    print('ready', flush=True)
    end = time.monotonic() + amount
    while time.monotonic() < end:
        cnx = pool.borrow(random.choice(infos))
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_sleep(0.005)')
        cnx.commit()
        pool.give_back(cnx)
pool.shutdown()
'''


class Container:
    """A child process in a PID namespace of its own."""

    def __init__(self, path, budget, mode, amount, infos):
        import json
        self.process = subprocess.Popen(
            ['unshare', '--pid', '--fork', '--mount-proc', sys.executable, '-c', CHILD, ROOT,
             path, str(budget), mode, str(amount), json.dumps(infos)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.inner_pid = int(self.process.stdout.readline())
        assert self.process.stdout.readline().strip() == 'ready'

    def host_pid(self):
        """The pid, in our namespace, of the python that is pid 1 in the child's."""
        unshare = self.process.pid
        with open(f'/proc/{unshare}/task/{unshare}/children') as handle:
            return int(handle.read().split()[0])

    def finish(self, timeout=60):
        if self.process.poll() is None:
            try:
                self.process.stdin.write('\n')
                self.process.stdin.flush()
            except OSError:
                pass
        return self.process.wait(timeout)

    def kill(self):
        try:
            os.kill(self.host_pid(), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        self.process.kill()
        self.process.wait(10)


def held_by(state, pid):
    return sum(row['held'] for row in state.processes() if row['pid'] == pid)


def test_a_live_process_of_another_namespace_is_never_reaped(pg, info, tmp_path, app):
    path = str(tmp_path / 'state')
    ours = SharedBudget(ss.SharedState(path), 6, role='http')
    container = Container(path, 6, 'hold', 3, [info('db1'), info('db2')])
    try:
        state = ours.state
        row = next(r for r in state.processes() if r['pid'] == container.inner_pid)
        assert row['held'] == 3
        # Control: the old check, /proc of this namespace, takes it for dead.
        assert ss.process_start(row['pid']) != \
            state.cells[ss.PROC_BASE + row['row'] * ss.P_FIELDS + ss.P_START]
        for _ in range(5):
            state.reap(force=True)
            assert held_by(state, container.inner_pid) == 3
            assert state.alive(row['row'])
        assert state.total_held() == 3
        assert sorted(r['pid'] for r in state.live_processes()) == \
            sorted([os.getpid(), container.inner_pid])
        # Killed: the kernel drops its row's lock, the slots come back within 5 s.
        container.kill()
        deadline = time.monotonic() + 5
        while state.reap(force=True) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.total_held() == 0 and not state.alive(row['row'])
        assert pg.wait_until(lambda: pg.count_connections(app) == 0)
    finally:
        container.kill()
        ours.state.close()


def test_processes_of_separate_namespaces_never_exceed_the_budget(pg, info, tmp_path, app):
    """Three containers and this process churn on a budget of 3 over two databases while
    this process watches pg_stat_activity; one container is SIGKILLed holding slots and
    the others get them back."""
    path = str(tmp_path / 'state')
    budget = 3
    infos = [info('db1'), info('db2')]
    pool = ConnectionPool(8, settings=Settings(wait_timeout=30),
                          budget=SharedBudget(ss.SharedState(path), budget, role='http'))
    churners = [Container(path, budget, 'churn', 6, infos) for _ in range(3)]
    holder = None
    try:
        peak = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            peak = max(peak, pg.count_connections(app))
            cnx = pool.borrow(infos[0])
            peak = max(peak, pg.count_connections(app))
            pool.give_back(cnx)
        assert 0 < peak <= budget
        for churner in churners:
            assert churner.finish() == 0
        # A container holding two slots dies; a borrower here gets them within 5 s.
        holder = Container(path, budget, 'hold', 2, infos)
        first = pool.borrow(infos[1])
        started = time.monotonic()
        os.kill(holder.host_pid(), signal.SIGKILL)
        second = pool.borrow(infos[0])
        third = pool.borrow(infos[1])
        assert time.monotonic() - started < 5
        assert pg.wait_until(lambda: pg.count_connections(app) <= budget)
        for cnx in (first, second, third):
            pool.give_back(cnx)
    finally:
        for churner in churners:
            churner.kill()
        if holder is not None:
            holder.kill()
        pool.shutdown()
