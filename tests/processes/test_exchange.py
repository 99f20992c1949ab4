"""Idle connections move between processes (db_pool_shared_idle): real forked processes,
real PostgreSQL, SIGKILL."""
import os
import signal
import threading
import time

import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.shared.exchange import IdleExchange
from odoo_pool_patch.config.options import Settings

from testkit import backend_pid
from testkit.peers import borrow_while_peer_gives_back, held, make_pool, Peer, start_donor, stop



@pytest.mark.parametrize('shared_idle', [True, False])
def test_a_process_takes_the_idle_connection_of_another(pg, info, tmp_path, shared_idle):
    path = str(tmp_path / 'segment')
    pid, donor_backend = start_donor(path, info('db2'))
    pool = make_pool(path, exchange=shared_idle)
    try:
        taker_info = info('db2', application_name=info()['application_name'] + '-taker')
        cnx = pool.borrow(taker_info)
        with cnx.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('application_name'), "
                        "current_database()")
            backend, application, database = cur.fetchone()
        cnx.commit()
        if not shared_idle:
            assert backend != donor_backend and pool.stats.opened == 1
            return
        # The same server session, now ours: named after us, its slot moved with it.
        assert backend == donor_backend and cnx.info.backend_pid == donor_backend
        assert application.endswith('-taker') and database == 'db2'
        assert (pool.stats.taken, pool.stats.opened) == (1, 0)
        assert held(pool.budget.state) == {pid: 0, os.getpid(): 1}
        assert pg.count_connections(datname='db2') == 1
        pool.give_back(cnx)
        again = pool.borrow(taker_info)
        assert backend_pid(again) == donor_backend and pool.stats.reused == 1
        pool.give_back(again)
        stop(pid)                   # the donor's exit does not end the session it gave
        assert pg.count_connections(datname='db2') == 1
        pool.close_all()
        assert pg.wait_until(lambda: pg.count_connections(datname='db2') == 0)
        assert pg.wait_until(lambda: pool.budget.state.total_held() == 0)   # exit seen
    finally:
        stop(pid)
        pool.shutdown()


def test_a_connection_with_session_state_is_not_given(pg, info, tmp_path):
    path = str(tmp_path / 'segment')
    pid, donor_backend = start_donor(path, info('db3'), dirty=True)
    pool = make_pool(path)
    try:
        cnx = pool.borrow(info('db3'))
        assert backend_pid(cnx) != donor_backend
        assert (pool.stats.taken, pool.stats.opened) == (0, 1)
        assert pg.count_connections(info()['application_name'], datname='db3') == 2
        pool.give_back(cnx)
    finally:
        stop(pid)
        pool.shutdown()


def test_a_taker_killed_after_taking_frees_its_slot_and_the_session(pg, info, tmp_path):
    path = str(tmp_path / 'segment')
    pid, donor_backend = start_donor(path, info('db1'))
    read_end, write_end = os.pipe()
    taker = os.fork()
    if taker == 0:                          # pragma: no cover - child
        try:
            pool = make_pool(path)
            cnx = pool.borrow(info('db1'))
            os.write(write_end, f'{backend_pid(cnx)} {pool.stats.taken}'.encode())
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(write_end)
    state = ss.SharedState(path)
    try:
        backend, taken = map(int, os.read(read_end, 64).split())
        assert (backend, taken) == (donor_backend, 1)
        assert held(state) == {pid: 0, taker: 1}
        stop(taker, signal.SIGKILL)
        # The donor kept no copy: the session ends with the taker, its slot is reaped.
        assert pg.wait_until(lambda: pg.count_connections(datname='db1') == 0)
        state.reap(force=True)
        assert state.total_held() == 0
    finally:
        os.close(read_end)
        stop(taker, signal.SIGKILL)
        stop(pid)
        state.close()


def test_offers_of_a_killed_process_are_not_waited_for(pg, info, tmp_path):
    path = str(tmp_path / 'segment')
    pid, donor_backend = start_donor(path, info('db2'))
    pool = make_pool(path)
    try:
        khash = pool.budget.exchange.hash_of(tuple(sorted(
            (k, str(v)) for k, v in info('db2').items() if k != 'password')))
        assert pool.budget.exchange.offered(khash)
        stop(pid, signal.SIGKILL)
        started = time.monotonic()
        cnx = pool.borrow(info('db2'))      # its offer is still published: refused at once
        assert time.monotonic() - started < 1.0
        assert backend_pid(cnx) != donor_backend and pool.stats.opened == 1
        pool.give_back(cnx)
        pool.budget.state.reap(force=True)
        assert not pool.budget.exchange.offered(khash)
    finally:
        stop(pid)
        pool.shutdown()


def in_child(function):
    """function() in a forked child; its repr comes back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                            # pragma: no cover - child
        try:
            os.write(write_end, repr(function()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = os.read(read_end, 4096)
    os.close(read_end)
    os.waitpid(pid, 0)
    return data.decode()


def test_the_slot_moves_once_when_the_donor_gives_up_waiting(tmp_path):
    """The hand-over token: a donor that saw no acknowledgement and a taker that comes
    late decide once, under the lock; a late taker is refused whatever the donor did
    since (served another request, or gave up on another). The old check accepted
    any taker whose serial was not the refused one, so a taker of request 5 late past
    request 6 took a session the donor had kept and handed on (two owners)."""
    path = str(tmp_path / 'segment')
    donor_budget = SharedBudget(ss.SharedState(path), 4, role='http')
    assert donor_budget.try_acquire(1) and donor_budget.try_acquire(1)
    row, pid = donor_budget.row, os.getpid()

    def take(serial):
        return SharedBudget(ss.SharedState(path), 4, role='http').take_slot(row, pid, serial)
    donor_budget.promise(5)
    assert donor_budget.settle(5) is False              # gave up on request 5
    assert in_child(lambda: take(5)) == 'False'         # its taker, late: refused
    assert held(donor_budget.state)[pid] == 2
    donor_budget.promise(6)
    assert in_child(lambda: take(5)) == 'False'         # late past a new promise: refused
    assert in_child(lambda: take(6)) == 'True'          # request 6: taken, then the donor looks
    assert donor_budget.settle(6) is True
    assert held(donor_budget.state)[pid] == 1
    assert in_child(lambda: take(5)) == 'False'         # late past a take (old code: True)
    assert in_child(lambda: take(6)) == 'False'         # taken once only
    donor_budget.promise(7)
    assert donor_budget.settle(7) is False
    assert in_child(lambda: take(5)) == 'False' and in_child(lambda: take(7)) == 'False'
    assert in_child(lambda: take(8)) == 'False'         # never promised
    assert held(donor_budget.state)[pid] == 1


def test_a_taker_never_takes_from_a_donor_whose_row_was_reaped(tmp_path):
    """A reaped donor's row says nothing of what it did before dying: it may have kept
    the session and handed it on (token 0, then -s2). A late taker gives up."""
    path = str(tmp_path / 'segment')

    def donor():
        budget = SharedBudget(ss.SharedState(path), 4, role='http')
        budget.try_acquire(1)
        budget.promise(9)
        return budget.row, os.getpid()
    row, pid = eval(in_child(donor))
    state = ss.SharedState(path)
    assert state.reap(force=True) == 1                  # its slot freed with its row
    taker = SharedBudget(state, 4, role='http')
    assert taker.take_slot(row, pid, 9) is False and taker.held() == 0
    state.close()


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to run a process as another user')
def test_a_process_of_another_user_gets_nothing(pg, info, tmp_path):
    """Abstract Unix socket names are visible to every local user: the donor checks its peer."""
    import socket
    from odoo_pool_patch.shared import exchange
    path = str(tmp_path / 'segment')
    os.chmod(tmp_path, 0o1777)     # (sticky: the state file's directory may not be 0777)
    pid, _backend = start_donor(path, info('db1'))
    state = ss.SharedState(path)
    try:
        row = next(r['row'] for r in state.processes() if r['pid'] == pid)
        probe = SharedBudget(state, 4, role='other')
        khash = IdleExchange(probe).hash_of(tuple(sorted(
            (k, str(v)) for k, v in info('db1').items() if k != 'password')))
        address = IdleExchange(probe)._address(row, pid)

        def ask(uid):
            if uid is not None:
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(2)
                conn.connect(address)
                conn.send(exchange._REQUEST.pack(khash, os.getpid(), row, 1))
                message, fds, _flags, _addr = socket.recv_fds(conn, 65536, 1)
                for fd in fds:
                    os.close(fd)    # no acknowledgement: the donor keeps it
                return message[:1], len(fds)
        assert in_child(lambda: ask(65534)) == repr((b'N', 0))
        assert in_child(lambda: ask(None)) == repr((b'Y', 1))       # control: same user
    finally:
        stop(pid)
        state.close()


def test_room_is_made_on_the_database_other_processes_offer_most(pg, info, tmp_path):
    """Full budget, a third database wanted: the pool closes its connection to the database
    with the most idle connections instance-wide, not its least recently used one, so that
    every database keeps one to take."""
    path = str(tmp_path / 'segment')
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:                          # pragma: no cover - child
        try:
            pool = make_pool(path, budget=3)
            held = [pool.borrow(info('db2')), pool.borrow(info('db2'))]
            for cnx in held:
                pool.give_back(cnx)
            os.write(write_end, b'ready')
            signal.sigwait({signal.SIGTERM})
            os._exit(0)
        finally:
            os._exit(1)
    os.close(write_end)
    os.read(read_end, 16)
    os.close(read_end)
    pool = make_pool(path, budget=3)
    try:
        first = pool.borrow(info('db1'))
        pool.give_back(first)               # db1: least recently used from here on
        second = pool.borrow(info('db2'))   # taken from the child, which keeps one
        pool.give_back(second)
        assert (pool.stats.taken, pool.budget.state.total_held()) == (1, 3)
        third = pool.borrow(info('db3'))    # no room, nothing offered: close one of ours
        pool.give_back(third)
        assert pool.stats.closed_room == 1
        assert pg.wait_until(lambda: pg.count_connections(datname='db2') == 1)
        assert pg.count_connections(datname='db1') == 1     # LRU would have closed it
        again = pool.borrow(info('db1'))
        assert again is first and pool.stats.reused == 1
        pool.give_back(again)
    finally:
        stop(child)
        pool.shutdown()


@pytest.mark.parametrize('await_busy', [5.0, 0.0])
def test_a_full_budget_waits_for_a_connection_in_use_elsewhere_rather_than_open_one(
        pg, info, tmp_path, monkeypatch, await_busy):
    """Budget full, nothing idle to db1 anywhere but one in use in another process: the
    borrower waits for it to come back and takes it, instead of closing its db2
    connection and opening a backend. Nothing of db3 in use anywhere: no wait."""
    from odoo_pool_patch.pool import sharing as pool_sharing
    monkeypatch.setattr(pool_sharing, 'AWAIT_BUSY', await_busy)
    path = str(tmp_path / 'segment')
    peer = Peer(path, info, budget=2)
    pool = make_pool(path, budget=2)
    try:
        cnx, busy = borrow_while_peer_gives_back(pool, peer, info, 1.0)
        if await_busy:
            assert backend_pid(cnx) == busy
            assert (pool.stats.awaited, pool.stats.taken, pool.stats.closed_room) == (1, 1, 0)
        else:                               # control: room made, a backend opened
            assert backend_pid(cnx) != busy
            assert (pool.stats.awaited, pool.stats.taken, pool.stats.closed_room) == (0, 0, 1)
        pool.give_back(cnx)
        cnx = pool.borrow(info('db3'))
        assert pool.stats.awaited == (1 if await_busy else 0)
        pool.give_back(cnx)
    finally:
        peer.stop()
        pool.shutdown()


@pytest.mark.parametrize('max_shells', [2, 0])
def test_a_connection_is_taken_into_the_object_of_one_given_before(
        pg, info, tmp_path, monkeypatch, max_shells):
    """The psycopg2 object of a taken connection, once given on, takes the next connection
    of its database: the real session under it, client-side settings back to a new one's."""
    from odoo_pool_patch.shared import exchange
    monkeypatch.setattr(exchange, 'MAX_SHELLS', max_shells)
    path = str(tmp_path / 'segment')
    peer = Peer(path, info)
    pool = make_pool(path)
    try:
        backend = peer.do('borrow', 'db2')
        peer.do('back', 'db2')
        first = pool.borrow(info('db2'))            # taken: an object made by the take
        first.set_session(isolation_level='SERIALIZABLE', readonly=True)
        assert backend_pid(first) == backend
        first.commit()
        pool.give_back(first)
        assert peer.do('borrow', 'db2') == backend  # given on: ours is kept as a shell
        peer.do('back', 'db2')
        again = pool.borrow(info('db2'))
        assert pool.stats.taken == 2 and pool.stats.given == 1
        assert (again is first) == bool(max_shells)
        assert backend_pid(again) == backend == again.get_backend_pid()
        assert (again.isolation_level, again.readonly, again.autocommit) == (None, None, False)
        with again.cursor() as cur:
            cur.execute("SELECT current_setting('transaction_read_only'), "
                        "current_setting('application_name')")
            assert cur.fetchone() == ('off', info()['application_name'])
        again.commit()
        pool.give_back(again)
    finally:
        peer.stop()
        pool.shutdown()


def test_a_kept_object_never_takes_a_session_with_other_parameters(pg, info, tmp_path):
    """The shell libpq still reports the session parameters of its first session: a
    session with others (here a database default changed meanwhile) gets a new object."""
    path = str(tmp_path / 'segment')
    peer = Peer(path, info)
    pool = make_pool(path)
    try:
        peer.do('borrow', 'db3')
        peer.do('back', 'db3')
        shell = pool.borrow(info('db3'))
        old_zone = shell.info.parameter_status('TimeZone')
        pool.give_back(shell)
        peer.do('borrow', 'db3')                # takes it: ours becomes a shell
        peer.do('close', 'db3')
        pg.sql("ALTER DATABASE db3 SET TimeZone = 'Asia/Tokyo'")
        backend = peer.do('borrow', 'db3')      # a new session, in Tokyo
        peer.do('back', 'db3')
        assert pool.budget.exchange._n_shells == 1
        cnx = pool.borrow(info('db3'))
        assert old_zone != 'Asia/Tokyo'
        assert backend_pid(cnx) == backend and pool.stats.taken == 2
        assert cnx is not shell and shell.closed
        assert cnx.info.parameter_status('TimeZone') == 'Asia/Tokyo'
        pool.give_back(cnx)
    finally:
        pg.sql('ALTER DATABASE db3 RESET TimeZone')
        peer.stop()
        pool.shutdown()


@pytest.mark.parametrize('queue_seen', [True, False])
def test_no_wait_for_connections_in_use_while_borrowers_queue(
        pg, info, tmp_path, monkeypatch, queue_seen):
    """Overload: borrowers already queue for the budget, so a borrower goes to the fair
    queue at once instead of first waiting for a connection in use to come back."""
    path = str(tmp_path / 'segment')
    holder, queued = Peer(path, info, budget=1), Peer(path, info, budget=1)
    pool = make_pool(path, budget=1)
    pool.settings = Settings(wait_timeout=30)
    if not queue_seen:                      # control: the pool does not see the queue
        monkeypatch.setattr(pool.budget, 'waiting', lambda: 0)
    state = ss.SharedState(path)
    threads = []
    try:
        holder.do('borrow', 'db1')          # the budget's only slot, in use
        threads.append(threading.Thread(target=queued.do, args=('borrow', 'db2')))
        threads[-1].start()
        assert pg.wait_until(lambda: state.cells[ss.H_WAITING] == 1)
        got = []
        threads.append(threading.Thread(target=lambda: got.append(pool.borrow(info('db1')))))
        threads[-1].start()
        assert pg.wait_until(lambda: state.cells[ss.H_WAITING] == 2)
        assert pool.stats.awaited == (0 if queue_seen else 1)
        holder.do('back', 'db1')            # its slot goes to the queue: db2, then us
        threads[0].join(10)
        queued.do('back', 'db2')
        threads[1].join(10)
        assert got and pool.stats.budget_waits == 1
        pool.give_back(got[0])
    finally:
        for thread in threads:
            thread.join(10)
        holder.stop()
        queued.stop()
        pool.shutdown()
        state.close()


def test_no_wait_for_a_connection_this_process_holds(pg, info, tmp_path, monkeypatch):
    """A nested cursor (Odoo's cron opens one per job on its database): the connection in
    use is this process's own, it cannot come back while the borrower waits."""
    from odoo_pool_patch.pool import sharing as pool_sharing
    monkeypatch.setattr(pool_sharing, 'AWAIT_BUSY', 5.0)
    pool = make_pool(str(tmp_path / 'segment'), budget=2)
    try:
        outer = pool.borrow(info('db1'))
        pool.give_back(pool.borrow(info('db2')))    # the budget of 2 is full
        inner = pool.borrow(info('db1'))
        assert pool.stats.awaited == 0 and pool.stats.closed_room == 1
        assert backend_pid(inner) != backend_pid(outer)
        pool.give_back(inner)
        pool.give_back(outer)
    finally:
        pool.shutdown()
