"""A forked child resets the engine's per-process state in one stated order
(``after_fork.ORDER``), whatever the order the modules were imported in, and a
step that fails does not stop the ones after it. Real fork()."""
import ast
import os
import threading

import pytest

from odoo_pool_patch import after_fork
from odoo_pool_patch.pool import connection_pool as pool
from odoo_pool_patch.pool import slots
from odoo_pool_patch.replicas import replica_health

from testkit import ROOT
from testkit.forks import collect, fork


def steps_run_in_a_child(monkeypatch, failing=()):
    """Fork with every registered step wrapped to note its name: the names noted in
    the child, in the order they ran (the steps in ``failing`` raise instead)."""
    ran = []

    def noted(name, step):
        def run():
            ran.append(name)
            if name in failing:
                raise RuntimeError(f'{name} failed on purpose')
            step()
        return run
    for name, step in list(after_fork._steps.items()):
        monkeypatch.setitem(after_fork._steps, name, noted(name, step))
    pid, pipe = fork(lambda: ran)
    return collect(pid, pipe)


def test_a_forked_child_runs_every_step_in_the_stated_order(monkeypatch):
    # pool imports every module that has a step but replica_health (replicas configured)
    assert pool.after_fork is replica_health.after_fork is after_fork
    assert set(after_fork._steps) == set(after_fork.ORDER)
    assert steps_run_in_a_child(monkeypatch) == list(after_fork.ORDER)


def test_a_step_that_fails_does_not_stop_the_next(monkeypatch, caplog):
    assert steps_run_in_a_child(monkeypatch, failing={'parking'}) == list(after_fork.ORDER)


def test_no_engine_module_registers_a_fork_hook_of_its_own():
    """Only after_fork calls os.register_at_fork (else that hook runs in import order)."""
    engine = os.path.join(ROOT, 'odoo_pool_patch')
    found = []
    for name in sorted(os.listdir(engine)):
        if not name.endswith('.py') or name == 'after_fork.py':
            continue
        with open(os.path.join(engine, name)) as handle:
            tree = ast.parse(handle.read())
        found += [f'{name}:{node.lineno}' for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == 'register_at_fork']
    assert not found


def lock_is_free_in_a_child(lock_of):
    """Fork while a thread of the parent holds ``lock_of()`` (as the replica health
    thread or a waiting borrower may at any moment): whether the child can take it."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock_of():
            held.set()
            release.wait(30)
    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    held.wait(10)
    try:
        def take():
            lock = lock_of()
            free = lock.acquire(timeout=2)
            if free:
                lock.release()
            return free
        pid, pipe = fork(take)
        return collect(pid, pipe)
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize('lock', ['router counts', 'monitor', 'outage counts'])
def test_a_child_forked_while_a_thread_holds_a_lock_of_the_parent_can_take_it(
        pg, tmp_path, lock):
    from odoo_pool_patch.shared.outage import Outages
    from odoo_pool_patch.replicas.replica_health import ACTIVE, start_routing
    from odoo_pool_patch.replicas.router import Target
    from odoo_pool_patch.shared.shared_state import SharedState
    from odoo_pool_patch.config.options import Settings
    targets = [Target(0, pg.host, pg.port, 0, 'primary'), Target(1, pg.host, pg.port, 1)]
    router = start_routing(SharedState(str(tmp_path / 'state')), targets, Settings(),
                           {'user': 'odoo', 'sslmode': 'disable'})
    outages = Outages()
    try:
        lock_of = {'router counts': lambda: router._counts_lock,
                   'monitor': lambda: router.monitor._lock,
                   'outage counts': lambda: outages._count_lock}[lock]
        assert lock_is_free_in_a_child(lock_of)
    finally:
        router.stop()
        ACTIVE.clear()


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize('registry', ['in flight', 'exiting', 'parking exiting'])
def test_a_child_closes_the_parent_s_session_copies_and_nothing_that_took_their_number(
        pools, info, tmp_path, registry):
    """The parent's thread may close a noted descriptor (a session on its way to another
    process, a closed connection's watch on its backend) just before another thread makes
    a pipe and forks: the pipe gets the number, and the child must not close it. A
    noted descriptor still open is closed in the child (else the session outlives its
    owner)."""
    from time import monotonic
    from odoo_pool_patch.shared.parking import IN_FLIGHT, mark_in_flight
    from testkit.peers import master
    pool = pools(2)
    cnx = pool.borrow(info())
    live, gone = os.dup(cnx.fileno()), os.dup(cnx.fileno())
    shared = master(str(tmp_path / 'segment'))
    parking = shared.exchange.parking
    notes = {'in flight': lambda fd: mark_in_flight(fd),
             'exiting': lambda fd: pool.books.exiting.append(
                 [fd, monotonic() + 60, 0, after_fork.identity(fd)]),
             'parking exiting': lambda fd: parking._exiting.append(
                 [fd, monotonic() + 60, 0, after_fork.identity(fd)])}[registry]
    notes(live)
    notes(gone)
    os.close(gone)                      # closed by the parent, still noted
    read_end, write_end = os.pipe()     # ... and its number given to a pipe
    try:
        assert gone in (read_end, write_end)
        session = after_fork.identity(live)
        pid, pipe = fork(lambda: [is_open(live) and after_fork.identity(live) == session,
                                  is_open(read_end), is_open(write_end)])
        assert collect(pid, pipe) == [False, True, True]   # (the number may be reused)
    finally:
        for fd in (read_end, write_end, live):
            os.close(fd)
        IN_FLIGHT.pop(live, None)
        IN_FLIGHT.pop(gone, None)
        pool.books.exiting[:] = [e for e in pool.books.exiting if e[0] not in (live, gone)]
        parking._exiting[:] = []
        shared.exchange.close()
        pool.give_back(cnx)


def test_a_connection_on_its_way_to_the_parking_is_neutralized_in_a_child(family, info):
    """Between leaving IDLE and being parked (or back in IDLE) a connection is in no book
    of its pool: a child forked then must still point its copy away (else the session
    outlives its owner, held open by the child)."""
    start, _peers = family
    _shared, _make, make_pool = start(budget=4)
    pool = make_pool()
    cnx = pool.borrow(info('db2'))
    pool.give_back(cnx)
    with pool.books.lock:                    # the locked step of a park (park_wanted's)
        pool.books.move_locked(cnx, slots.PARKING)
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        session, devnull = after_fork.identity(cnx.fileno()), after_fork.identity(null)
        os.close(null)
        pid, pipe = fork(lambda: after_fork.identity(cnx.fileno()))
        assert tuple(collect(pid, pipe)) == devnull != session
        assert after_fork.identity(cnx.fileno()) == session     # the parent's is untouched
    finally:
        pool.sharing._after_park(cnx, False)    # back in IDLE
    assert cnx not in pool.books.lent and pool.borrow(info('db2')) is cnx
