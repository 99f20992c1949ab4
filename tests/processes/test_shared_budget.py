"""One budget for many processes: real forked processes, real PostgreSQL, SIGKILL."""
import os
import random
import re
import signal
import struct
import threading
import time

import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool import sharing as pool_sharing
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit.forks import collect, fork


@pytest.fixture
def shm_path(tmp_path):
    path = str(tmp_path / 'segment')
    yield path


def make_budget(path, budget, role='http', **kwargs):
    return SharedBudget(ss.SharedState(path), budget, role=role, **kwargs)


def test_segment_size_is_fixed_and_stated():
    assert ss.SIZE == 372_640
    assert ss.N_WAIT >= 1024


def test_the_region_views_read_and_write_the_layouts_cells(shm_path):
    """Each region's Row class names the cells of the layout's offsets; a process row
    registered through them says who owns it (a row with pid 0 is a free row)."""
    state = ss.SharedState(shm_path)
    try:
        row = state.register('cron')
        base = ss.PROC_BASE + row * ss.P_FIELDS
        assert state.cells[base + ss.P_PID] == state.process(row).pid == os.getpid()
        assert ss.ROLES[state.process(row).role] == 'cron'
        lot = ss.Lot(state.cells, 3)
        lot.count += 2
        assert state.cells[ss.LOT_BASE + 3 * ss.K_FIELDS + ss.K_COUNT] == 2
        assert list(ss.Lot.column(state.cells, 'count'))[3] == 2
        state.header.waiting = 5
        assert state.cells[ss.H_WAITING] == 5
        state.header.waiting = 0
        for region in (ss.Header, ss.Process, ss.Waiter, ss.Sample, ss.Detail, ss.Lease,
                       ss.Server, ss.Offer, ss.Lot, ss.Outage):
            assert max(region.FIELDS.values()) < region.WIDTH
            assert region.BASE + region.COUNT * region.WIDTH <= ss.CELLS
        assert ss.Outage.BASE + ss.Outage.COUNT * ss.Outage.WIDTH == ss.CELLS
    finally:
        state.close()


def test_eight_processes_never_exceed_the_budget_and_never_fail(pg, shm_path, info, app):
    budget_size = 4

    def hammer(number):
        budget = make_budget(shm_path, budget_size)
        pool = ConnectionPool(8, settings=Settings(wait_timeout=60), budget=budget,
                              timer_period=0.2)
        rng = random.Random(number)
        for _ in range(25):
            cnx = pool.borrow(info(rng.choice(('db1', 'db2', 'db3'))))
            with cnx.cursor() as cur:
                cur.execute('SELECT pg_sleep(%s)', [rng.uniform(0.001, 0.01)])
            cnx.rollback()
            pool.give_back(cnx)
        return {'waits': pool.stats.budget_waits, 'timeouts': pool.stats.budget_timeouts}

    children = [fork(hammer, n) for n in range(8)]
    peak, alive = 0, {pid for pid, _ in children}
    while alive:
        alive = {pid for pid in alive if os.waitpid(pid, os.WNOHANG)[0] == 0}
        peak = max(peak, pg.count_connections(app))
        time.sleep(0.01)
    results = [collect(pid, fd) for pid, fd in children]
    assert all('error' not in r for r in results), results
    assert peak <= budget_size, peak
    assert sum(r['waits'] for r in results) > 0          # the budget really was contended
    assert sum(r['timeouts'] for r in results) == 0
    state = ss.SharedState(shm_path)
    state.reap(force=True)
    assert state.total_held() == 0                       # every child died: all reclaimed
    assert state.cells[ss.H_WAITING] == 0


def test_waiters_served_by_priority_then_fifo(pg, shm_path, info):
    """Fill the budget, queue waiters of mixed roles in a known order, free slots one by one."""
    holder_budget = make_budget(shm_path, 1, role='http')
    holder = ConnectionPool(2, budget=holder_budget, settings=Settings(wait_timeout=60))
    held = holder.borrow(info())
    order_file = shm_path + '.order'
    # (name, role, database): long-lived first, then http, gevent, cron; FIFO within a role.
    plan = [('cron-1', 'cron', 'db1'), ('http-1', 'http', 'db1'), ('gevent-1', 'gevent', 'db1'),
            ('http-2', 'http', 'db2'), ('long-1', 'http', 'postgres'), ('cron-2', 'cron', 'db2'),
            ('http-3', 'http', 'db1')]

    def waiter(name, role, database):
        budget = make_budget(shm_path, 1, role=role)
        pool = ConnectionPool(2, budget=budget, settings=Settings(wait_timeout=60),
                              timer_period=3600)
        cnx = pool.borrow(info(database))
        with open(order_file, 'a') as handle:
            handle.write(name + '\n')
        time.sleep(0.05)
        pool.give_back(cnx, keep_in_pool=False)
        return name

    children = []
    for number, (name, role, database) in enumerate(plan, 1):
        children.append(fork(waiter, name, role, database))
        deadline = time.time() + 10
        while holder_budget.waiting() < number and time.time() < deadline:
            time.sleep(0.01)
        assert holder_budget.waiting() == number
    holder.give_back(held, keep_in_pool=False)
    for pid, fd in children:
        collect(pid, fd)
    with open(order_file) as handle:
        served = handle.read().split()
    assert served == ['long-1', 'http-1', 'http-2', 'http-3', 'gevent-1', 'cron-1', 'cron-2']
    holder.shutdown()


def test_cron_reserve_keeps_a_slot_for_cron(pg, shm_path, info):
    http = make_budget(shm_path, 2, cron_reserve=1, role='http')
    pool = ConnectionPool(4, budget=http, settings=Settings(wait_timeout=0.5))
    first = pool.borrow(info())
    with pytest.raises(Exception, match='instance-wide budget of 2'):
        pool.borrow(info('db2'))                 # the last slot is cron's

    def cron_job():
        budget = make_budget(shm_path, 2, cron_reserve=1, role='cron')
        cron_pool = ConnectionPool(2, budget=budget, settings=Settings(wait_timeout=0.5))
        cnx = cron_pool.borrow(info('db3'))
        cron_pool.give_back(cnx, keep_in_pool=False)
        return 'ok'
    assert collect(*fork(cron_job)) == 'ok'
    pool.give_back(first)
    pool.shutdown()


def test_idle_connections_of_one_process_move_to_a_waiter_in_another(pg, shm_path, info, app):
    """A sleeping process holding idle connections gives them up while someone waits."""
    budget_size = 3
    ready = shm_path + '.ready'

    def idle_holder():
        budget = make_budget(shm_path, budget_size)
        pool = ConnectionPool(8, budget=budget, settings=Settings(idle_timeout=3600),
                              timer_period=1.0)
        held = [pool.borrow(info(db)) for db in ('db1', 'db2', 'db3')]
        for cnx in held:
            pool.give_back(cnx)                  # idle, the whole budget
        open(ready, 'w').close()
        time.sleep(8)                            # "sleeping in select": only the timer runs
        mine = [r for r in budget.state.processes() if r['pid'] == os.getpid()]
        # Every claim to close a connection for a waiter was settled once it closed.
        assert budget.state.cells[ss.PROC_BASE + budget.row * ss.P_FIELDS + ss.P_SHEDDING] == 0
        assert mine and mine[0]['shed'] >= 1
        return pool.stats.shed

    pid, fd = fork(idle_holder)
    deadline = time.time() + 10
    while not os.path.exists(ready) and time.time() < deadline:
        time.sleep(0.01)
    assert pg.count_connections(app) == budget_size
    budget = make_budget(shm_path, budget_size)
    pool = ConnectionPool(4, budget=budget, settings=Settings(wait_timeout=5))
    start = time.monotonic()
    cnx = pool.borrow(info('db2'))
    waited = time.monotonic() - start
    assert waited < 5                            # within a timer tick, not the wait timeout
    assert pool.stats.budget_waits == 1 and pg.count_connections(app) <= budget_size
    pool.give_back(cnx)
    assert collect(pid, fd) >= 1
    pool.shutdown()


@pytest.mark.parametrize('burst', [pool_sharing.HANDOFF_BURST, 0])
def test_a_connection_given_back_goes_to_a_thread_waiting_for_its_database(
        pg, shm_path, info, monkeypatch, burst):
    """A thread waiting in the budget's queue for db1 gets the db1 connection another
    thread of its process gives back: no close, no new backend. Control
    (HANDOFF_BURST = 0): the connection is closed for the queue and a new one opened."""
    monkeypatch.setattr(pool_sharing, 'HANDOFF_BURST', burst)
    budget = make_budget(shm_path, 1)
    pool = ConnectionPool(4, budget=budget, settings=Settings(wait_timeout=10))
    first = pool.borrow(info('db1'))
    got = {}
    waiter = threading.Thread(target=lambda: got.update(cnx=pool.borrow(info('db1'))))
    waiter.start()
    assert pg.wait_until(lambda: budget.waiting() == 1, timeout=5)
    pool.give_back(first)
    waiter.join(10)
    with got['cnx'].cursor() as cur:
        cur.execute('SELECT 1')
    got['cnx'].rollback()
    if burst:
        assert got['cnx'] is first
        assert (pool.stats.handed_over, pool.stats.opened) == (1, 1)
    else:
        assert got['cnx'] is not first
        assert (pool.stats.handed_over, pool.stats.opened) == (0, 2)
    assert budget.state.cells[ss.H_WAITING] == 0
    pool.give_back(got['cnx'])
    pool.shutdown()


@pytest.mark.parametrize('burst', [pool_sharing.HANDOFF_BURST, 10 ** 9])
def test_hand_offs_leave_slots_for_other_processes(pg, shm_path, info, burst, monkeypatch):
    """Three threads of one process pass one db1 connection among themselves while
    another process waits for db2 on a budget of 1: after HANDOFF_BURST hand-offs in a
    row a slot goes to the queue, so the other process is served while they go on.
    Control (no limit): it waits until the threads stop."""
    monkeypatch.setattr(pool_sharing, 'HANDOFF_BURST', burst)
    go = shm_path + '.go'

    def other_process():
        while not os.path.exists(go):
            time.sleep(0.01)
        pool = ConnectionPool(2, budget=make_budget(shm_path, 1),
                              settings=Settings(wait_timeout=20), timer_period=3600)
        started = time.monotonic()
        cnx = pool.borrow(info('db2'))
        waited = time.monotonic() - started
        pool.give_back(cnx, keep_in_pool=False)
        return waited

    pid, fd = fork(other_process)                # before any thread starts
    budget = make_budget(shm_path, 1)
    pool = ConnectionPool(4, budget=budget, settings=Settings(wait_timeout=20))
    stop = time.monotonic() + 4

    def loop():
        while time.monotonic() < stop:
            cnx = pool.borrow(info('db1'))
            time.sleep(0.02)
            pool.give_back(cnx)
    threads = [threading.Thread(target=loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    open(go, 'w').close()
    waited = collect(pid, fd)
    for thread in threads:
        thread.join()
    if burst < 10 ** 9:
        assert waited < 2.0 and pool.stats.handed_over > 0
    else:
        assert waited > 2.5
    pool.shutdown()


def test_idle_falls_to_min_idle_instance_wide(pg, shm_path, info, app):
    """Two pools of one process (Odoo 18's read/write and read-only) and another process:
    after a burst the whole instance keeps db_pool_min_idle idle connections."""
    settings = Settings(idle_timeout=0.5)

    def other_process():
        budget = make_budget(shm_path, 20, min_idle=1)
        pool = ConnectionPool(5, budget=budget, settings=settings, timer_period=0.1)
        held = [pool.borrow(info(db)) for db in ('db1', 'db2', 'db3')]
        for cnx in held:
            pool.give_back(cnx)
        time.sleep(6)
        return pool.snapshot()['idle']

    pid, fd = fork(other_process)
    budget = make_budget(shm_path, 20, min_idle=1)
    pools = [ConnectionPool(5, budget=budget, settings=settings, timer_period=0.1, readonly=ro)
             for ro in (False, True)]
    for pool in pools:
        held = [pool.borrow(info(db)) for db in ('db1', 'db2', 'db3')]
        for cnx in held:
            pool.give_back(cnx)
    assert pg.wait_until(lambda: pg.count_connections(app) == 9, timeout=3)
    assert pg.wait_until(lambda: pg.count_connections(app) == 1, timeout=0.5 + 1.0 + 2.0)
    time.sleep(1.0)
    assert pg.count_connections(app) == 1
    remaining = collect(pid, fd) + sum(pool.snapshot()['idle'] for pool in pools)
    assert remaining == 1
    for pool in pools:
        pool.shutdown()


def kill_loop_child(shm_path, info_dict, hold_lock):
    budget = make_budget(shm_path, 3)
    pool = ConnectionPool(3, budget=budget, settings=Settings(wait_timeout=60),
                          timer_period=0.1)
    held = [pool.borrow(info_dict) for _ in range(2)]
    if hold_lock:
        with budget.state.locked():
            os.write(1, b'')                     # die here, holding the lock
            time.sleep(60)
    while True:
        for cnx in held:
            with cnx.cursor() as cur:
                cur.execute('SELECT 1')
            cnx.rollback()
        time.sleep(random.uniform(0, 0.01))


@pytest.mark.soak
def test_sigkill_at_random_moments_never_leaks_the_budget(pg, shm_path, info, app):
    observer = ss.SharedState(shm_path)
    for round_number in range(12):
        hold_lock = round_number % 3 == 0
        pid, fd = fork(kill_loop_child, shm_path, info(), hold_lock)
        deadline = time.time() + 10
        while observer.total_held() < 2 and time.time() < deadline:
            time.sleep(0.005)
        assert observer.total_held() == 2
        time.sleep(random.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
        killed_at = time.monotonic()
        # No deadlock: the lock is free again, and the slots come back within 5 s.
        while observer.total_held() and time.monotonic() - killed_at < 5:
            observer.reap()
            time.sleep(0.05)
        assert observer.total_held() == 0, f'round {round_number}: slots not reclaimed'
        with observer.locked():
            pass
    assert observer.cells[ss.H_WAITING] == 0
    assert pg.wait_until(lambda: pg.count_connections(app) == 0, timeout=5)


def test_budget_survives_a_waiter_killed_while_waiting(pg, shm_path, info):
    holder_budget = make_budget(shm_path, 1)
    holder = ConnectionPool(2, budget=holder_budget, settings=Settings(wait_timeout=60))
    cnx = holder.borrow(info())

    def doomed_waiter():
        budget = make_budget(shm_path, 1)
        ConnectionPool(2, budget=budget, settings=Settings(wait_timeout=60)).borrow(info('db2'))

    pid, fd = fork(doomed_waiter)
    deadline = time.time() + 10
    while holder_budget.waiting() < 1 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    holder_budget.state.reap(force=True)
    assert holder_budget.waiting() == 0
    holder.give_back(cnx, keep_in_pool=False)
    # The slot comes back once the backend has exited (seen by the maintenance tick).
    assert pg.wait_until(lambda: holder_budget.state.total_held() == 0, timeout=2)
    holder.shutdown()


def test_maintenance_pass_is_urgent_while_borrowers_wait_or_slots_wait_for_an_exit(
        pg, shm_path, info):
    """What makes a shared-budget process run its maintenance pass at once rather than
    at IDLE_TICK: a borrower waiting for the budget, a closed connection's slot waiting
    for its backend to exit (also in a closed pool)."""
    from odoo_pool_patch.pool import maintenance
    assert maintenance.SHED_TICK < maintenance.IDLE_TICK
    budget = make_budget(shm_path, 1)
    pool = ConnectionPool(2, budget=budget, settings=Settings(wait_timeout=60))
    cnx = pool.borrow(info())
    assert not maintenance._urgent([pool])          # budget full, nobody waits

    def waiter():
        other = ConnectionPool(2, budget=make_budget(shm_path, 1), settings=Settings(wait_timeout=60))
        other.give_back(other.borrow(info('db2')))

    pid, fd = fork(waiter)
    assert pg.wait_until(lambda: budget.waiting() == 1, timeout=10)
    assert maintenance._urgent([pool])
    pool.give_back(cnx, keep_in_pool=False)
    assert collect(pid, fd) is None                 # the waiter got the slot
    assert pg.wait_until(lambda: budget.state.total_held() == 0, timeout=5)
    assert not maintenance._urgent([pool])
    # A closed connection whose backend has not exited yet: it is busy (a query sent
    # over the raw socket), so the Terminate that close() sends waits behind it.
    busy = pool.borrow(info())
    backend = busy.get_backend_pid()
    query = b'SELECT pg_sleep(60)\0'
    os.write(busy.fileno(), b'Q' + struct.pack('!i', 4 + len(query)) + query)
    pool.give_back(busy, keep_in_pool=False)
    assert pool.books.exiting and maintenance._urgent([pool])
    pool.shutdown()
    assert pool._closed and maintenance._urgent([pool])    # a closed pool's too
    pg.sql('SELECT pg_terminate_backend(%s)', [backend])   # it exits: its slot is freed
    assert pg.wait_until(lambda: not pool.books.exiting, timeout=5)
    assert budget.state.total_held() == 0
    assert not maintenance._urgent([pool])


def test_maintenance_passes_are_rare_at_rest(pg, shm_path, info):
    """At rest a shared-budget process runs a pass every IDLE_TICK, not every SHED_TICK
    (a pass costs the worker CPU and the GIL)."""
    from odoo_pool_patch.pool import maintenance

    def count_passes():
        pool = ConnectionPool(2, budget=make_budget(shm_path, 4), settings=Settings())
        pool.give_back(pool.borrow(info()))         # starts the maintenance thread
        passes = []
        publish = maintenance._publish
        maintenance._publish = lambda pools: (passes.append(1), publish(pools))
        time.sleep(1.0)
        return len(passes)

    passes = collect(*fork(count_passes))
    assert 2 <= passes <= 15, passes    # about 4; a pass every SHED_TICK makes 50


@pytest.mark.parametrize('doorbell', [True, False], ids=['doorbell', 'polling'])
def test_a_waiter_gets_the_idle_connections_of_a_process_at_rest_at_once(
        pg, shm_path, info, app, doorbell):
    """A borrower starting to wait rings the doorbell of a process holding idle
    connections (or, without one, is noticed at its next wake-up, SHED_TICK), not at
    its next pass at rest: here that process's passes are a minute apart, and the
    borrower waits at most 3 s."""
    from odoo_pool_patch.shared import doorbell as doorbell_module
    from odoo_pool_patch.pool import maintenance
    if doorbell and doorbell_module._libc_syscall is None:
        pytest.skip('no futex here (not Linux x86-64/arm64): the maintenance threads poll')
    ready = shm_path + '.ready'

    def idle_holder():
        maintenance.IDLE_TICK = 60
        if not doorbell:
            ss.SharedState.doorbell = lambda self: None
        pool = ConnectionPool(8, budget=make_budget(shm_path, 2), timer_period=60,
                              settings=Settings(idle_timeout=3600))
        assert (maintenance._doorbell([pool]) is not None) == doorbell   # how it sleeps
        held = [pool.borrow(info(db)) for db in ('db1', 'db2')]
        for cnx in held:
            pool.give_back(cnx)                     # idle, the whole budget
        open(ready, 'w').close()
        time.sleep(6)
        return pool.stats.shed

    pid, fd = fork(idle_holder)
    assert pg.wait_until(lambda: os.path.exists(ready), timeout=10)
    assert pg.count_connections(app) == 2
    pool = ConnectionPool(4, budget=make_budget(shm_path, 2), settings=Settings(wait_timeout=3))
    cnx = pool.borrow(info('db3'))                  # PoolTimeout after 3 s otherwise
    assert pool.stats.budget_waits == 1
    pool.give_back(cnx)
    assert collect(pid, fd) >= 1
    pool.shutdown()


def test_threads_and_processes_share_one_budget(pg, shm_path, info, app):
    budget = make_budget(shm_path, 2)
    pool = ConnectionPool(8, budget=budget, settings=Settings(wait_timeout=30))
    errors = []

    def work():
        try:
            for _ in range(10):
                cnx = pool.borrow(info())
                time.sleep(0.005)
                pool.give_back(cnx)
        except Exception as exc:                 # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and pg.count_connections(app) <= 2
    pool.shutdown()


def test_shutdown_gives_the_budget_back(pg, shm_path, info):
    budget = make_budget(shm_path, 3)
    pool = ConnectionPool(3, budget=budget, timer_period=0.1)
    held = [pool.borrow(info()) for _ in range(3)]
    pool.give_back(held.pop())
    pool.shutdown()                 # two in use, one idle: all closed, slots freed on exit
    deadline = time.monotonic() + 30
    while budget.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.held() == 0


def test_history_keeps_totals_for_the_dashboard(pg, shm_path, info):
    budget = make_budget(shm_path, 5)
    pool = ConnectionPool(5, budget=budget)
    held = [pool.borrow(info()) for _ in range(3)]
    pool.give_back(held.pop())
    figures = pool.upkeep.figures()
    budget.publish(figures['in_use'], figures['idle'], figures['long_lived'])
    assert budget.state.record_history(period_ms=0)
    assert not budget.state.record_history(period_ms=60_000)   # one sample per period
    _, total, in_use, idle, waiting, long_lived = budget.state.history()[-1]
    assert (total, in_use, idle, waiting, long_lived) == (3, 2, 1, 0, 0)
    for cnx in held:
        pool.give_back(cnx)
    pool.shutdown()


def test_odoo_pool_top_shows_a_running_instance(pg, shm_path, info, tmp_path):
    import subprocess
    import sys
    budget = make_budget(shm_path, 7, role='http')
    pool = ConnectionPool(4, budget=budget, timer_period=0.1)
    held = [pool.borrow(info()) for _ in range(2)]
    pool.give_back(held.pop())
    time.sleep(0.3)                              # one maintenance tick publishes the figures
    out = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'top', '--once',
                          '--path', shm_path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'budget 7  held 2  in use 1  idle 1' in out.stdout
    assert f'{os.getpid():>8} http' in out.stdout
    mine = next(line for line in out.stdout.splitlines() if line.startswith(f'{os.getpid():>8}'))
    assert re.search(r'  \d+\.\ds db1 .*test_shared_budget\.py:\d+ in ', mine)
    not_ours = tmp_path / 'other'
    not_ours.write_bytes(b'x' * 10)
    os.chmod(not_ours, 0o600)
    bad = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'top', '--once',
                          '--path', str(not_ours)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and 'not a db_pooling shared state file' in bad.stderr
    assert not_ours.read_bytes() == b'x' * 10    # never written to
    pool.give_back(held[0])
    pool.shutdown()
