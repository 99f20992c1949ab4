"""Idle connections parked in kernel queues (see odoo_pool_patch.shared.parking): a master
process makes the budget and its exchange, workers forked from it share the queues.
Real forked processes, real PostgreSQL, SIGKILL."""
import contextlib
import os
import signal
import time

import pytest

from odoo_pool_patch.shared import parking as parking_module
from odoo_pool_patch.pool import sharing as pool_sharing
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.errors import PoolTimeout

from testkit import backend_pid
from testkit.peers import borrow_while_peer_gives_back, count, parked, peer



@pytest.mark.parametrize('parking', [True, False])
def test_a_parked_connection_is_taken_after_the_worker_that_parked_it_died(
        pg, info, app, tmp_path, family, parking):
    """Worker a gives back a db2 connection that worker b needed too: it parks it. a is
    then killed; the next borrower still gets that session, with no process to ask."""
    start, peers = family
    shared, make, new_pool = start()
    if not parking:
        shared.exchange.close()             # control: offers only, from a live process
    a = peer(peers, tmp_path, info, make)
    b = peer(peers, tmp_path, info, make)
    pool = new_pool()
    backend = a.do('borrow', 'db2')
    b.do('borrow', 'db2')                   # another worker needed db2: a parks its own
    a.do('back', 'db2')
    assert a.do('stat', 'parked') == (1 if parking else 0)
    assert parked(shared) == (1 if parking else 0)
    a.stop(signal.SIGKILL)
    cnx = pool.borrow(info('db2'))
    if parking:
        assert backend_pid(cnx) == backend == cnx.get_backend_pid()
        assert (pool.stats.unparked, pool.stats.opened) == (1, 0)
        assert parked(shared) == 0
    else:
        assert backend_pid(cnx) != backend and pool.stats.opened == 1
    cnx.commit()
    pool.give_back(cnx)
    # b's connection and ours (parked now: b needed db2), a's slot reaped if it held one.
    assert pg.wait_until(lambda: shared.state.total_held() == 2)
    assert pg.wait_until(lambda: count(pg, app, 'db2') == 2)


def test_a_worker_alone_on_its_database_keeps_its_connection(
        pg, info, tmp_path, family):
    """Nobody else needs db2: the connection stays in the pool, reused at no cost.
    Another worker needs it too: the next one given back is parked."""
    start, peers = family
    shared, make, new_pool = start()
    pool = new_pool()
    cnx = pool.borrow(info('db2'))
    pool.give_back(cnx)
    again = pool.borrow(info('db2'))
    assert again is cnx and (pool.stats.reused, pool.stats.parked) == (1, 0)
    other = peer(peers, tmp_path, info, make)
    other.do('borrow', 'db2')
    pool.give_back(again)
    assert pool.stats.parked == 1 and parked(shared) == 1
    assert other.do('stat', 'opened') == 1


@pytest.mark.parametrize('idle_timeout,min_idle', [(0.5, 0), (0.5, 1), (0, 0)])
def test_parked_connections_are_closed_after_the_idle_timeout(
        pg, info, app, tmp_path, family, idle_timeout, min_idle):
    """Two processes evict concurrently: db_pool_min_idle is kept all the same."""
    start, peers = family
    shared, make, new_pool = start(min_idle=min_idle, idle_timeout=idle_timeout)
    a = peer(peers, tmp_path, info, make)
    pool = new_pool()
    a.do('borrow', 'db2')
    cnx = pool.borrow(info('db2'))          # both needed db2: both park what they give back
    a.do('back', 'db2')
    pool.give_back(cnx)
    assert parked(shared) == 2 and shared.state.total_held() == 2
    if idle_timeout:
        assert pg.wait_until(lambda: count(pg, app, 'db2') == min_idle)
        assert pg.wait_until(lambda: shared.state.total_held() == min_idle)
        time.sleep(1.0)                     # both maintenance threads had their turn
        assert parked(shared) == min_idle and count(pg, app, 'db2') == min_idle
    else:                                   # control: no idle timeout, they stay
        time.sleep(1.5)
        assert count(pg, app, 'db2') == 2 and parked(shared) == 2


def park_two(shared, tmp_path, info, make, peers, pool, database='db2'):
    """Two connections of ``database`` parked (one from a peer, one from ``pool``)."""
    a = peer(peers, tmp_path, info, make)
    a.do('borrow', database)
    cnx = pool.borrow(info(database))
    a.do('back', database)
    pool.give_back(cnx)
    assert parked(shared) == 2
    return a


def test_a_full_budget_closes_a_parked_connection_to_open_another(
        pg, info, app, tmp_path, family):
    """Budget 2, both slots parked on db2: a db1 borrower closes one of them (waiting for
    its backend to exit) and opens its connection in that slot."""
    start, peers = family
    shared, make, new_pool = start(budget=2)
    pool = new_pool()
    park_two(shared, tmp_path, info, make, peers, pool)
    cnx = pool.borrow(info('db1'))
    assert (pool.stats.closed_room, pool.stats.opened) == (1, 2)
    assert parked(shared) == 1 and shared.state.total_held() == 2
    assert count(pg, app, 'db2') == 1 and count(pg, app, 'db1') == 1
    pool.give_back(cnx)


@pytest.mark.parametrize('shed', [True, False])
def test_borrowers_waiting_for_the_budget_get_the_slots_of_parked_connections(
        pg, info, app, tmp_path, family, monkeypatch, shed):
    """A borrower that cannot make room itself waits in the budget's queue: the
    maintenance closes parked connections for it."""
    monkeypatch.setattr(pool_sharing.Sharing, 'evict_parked', lambda self: False)
    if not shed:                            # control: parked connections never shed
        monkeypatch.setattr(parking_module.Parking, 'tick', lambda self, full, idle: 0)
    start, peers = family
    shared, make, new_pool = start(budget=2, wait_timeout=2)
    pool = new_pool()
    park_two(shared, tmp_path, info, make, peers, pool)
    if not shed:
        with pytest.raises(PoolTimeout):
            pool.borrow(info('db1'))
        return
    cnx = pool.borrow(info('db1'))
    assert pool.stats.budget_waits == 1
    assert parked(shared) == 1 and count(pg, app, 'db2') == 1
    pool.give_back(cnx)


@pytest.mark.parametrize('dsn', [True, False])
def test_closing_a_database_s_connections_closes_its_parked_ones(
        pg, info, app, tmp_path, family, dsn):
    """close_all(dsn), as Odoo does before dropping a database, reaches the parked
    connections of that database; close_all() of a process leaves the instance's."""
    start, peers = family
    shared, make, new_pool = start()
    pool = new_pool()
    park_two(shared, tmp_path, info, make, peers, pool)
    if dsn:
        pool.close_all(info('db2'))
        assert count(pg, app, 'db2') == 0
        assert parked(shared) == 0
        assert pg.wait_until(lambda: shared.state.total_held() == 0)
    else:
        pool.close_all()
        assert count(pg, app, 'db2') == 2 and parked(shared) == 2


def test_a_parked_connection_ended_by_the_server_is_not_handed_out(
        pg, info, app, tmp_path, family):
    start, peers = family
    shared, make, new_pool = start()
    pool = new_pool()
    cnx = pool.borrow(info('db2'))
    backend = backend_pid(cnx)
    cnx.commit()
    other = peer(peers, tmp_path, info, make)
    other.do('borrow', 'db2')
    pool.give_back(cnx)
    assert parked(shared) == 1
    with pg.connect() as admin, admin.cursor() as cur:
        cur.execute('SELECT pg_terminate_backend(%s)', [backend])
    assert pg.wait_until(lambda: count(pg, app, 'db2') == 1)
    cnx = pool.borrow(info('db2'))
    assert backend_pid(cnx) != backend and pool.stats.opened == 2
    assert parked(shared) == 0
    cnx.commit()
    pool.give_back(cnx)
    assert pg.wait_until(lambda: shared.state.total_held() == 2)


def test_a_count_left_by_a_process_killed_while_parking_is_corrected(
        pg, info, tmp_path, family):
    """A lot counted but empty, unchanged over two maintenance passes (a parker killed
    between its two steps), gives its slot back; a connection really parked stays."""
    start, peers = family
    shared, make, new_pool = start()
    pool = new_pool()
    other = peer(peers, tmp_path, info, make)
    other.do('borrow', 'db2')
    cnx = pool.borrow(info('db2'))
    pool.give_back(cnx)                     # really parked, in db2's lot
    parking = shared.exchange.parking
    khash = shared.exchange.hash_of(cnx.pooled.key)
    ghost = next(k for k in range(2, 100) if k != khash)
    base = parking._claim(ghost).start      # its row's first cell
    with shared.state.locked() as cells:    # what a parker killed before sendmsg leaves
        cells[base + ss.K_COUNT] += 1
        cells[base + ss.K_SEQ] += 1
        cells[ss.H_PARKED] += 1
    assert parked(shared) == 2
    parking.tick(True, 0)                   # first pass: seen empty, not yet corrected
    assert parked(shared) == 2
    parking.tick(True, 0)
    assert parked(shared) == 1 and parking.count(khash) == 1 and parking.count(ghost) == 0


def test_the_lots_of_an_instance_that_stopped_are_freed(pg, info, app, tmp_path, family):
    """The master and workers of an instance are gone (a restart): the connections they
    parked went with their queues, and the next instance on the same shared state gets
    their budget slots back. The lots of an instance still running are kept."""
    start, peers = family
    shared, make, new_pool = start()
    pool = new_pool()
    park_two(shared, tmp_path, info, make, peers, pool)
    path = str(tmp_path / 'segment')
    successor = SharedBudget(ss.SharedState(path), 4, role='master')
    successor.state.reap(force=True)
    assert parked(shared) == 2              # control: the instance is alive
    for peer_ in peers:
        peer_.stop()
    pool.shutdown()
    shared.exchange.close()                 # the last holder of its queues leaves
    successor.state.reap(force=True)
    assert parked(shared) == 0 and successor.state.total_held() == 0
    assert pg.wait_until(lambda: count(pg, app, 'db2') == 0)


@pytest.mark.parametrize('demand', [1.0, 0.0])
def test_a_borrower_waiting_for_a_connection_in_use_receives_it_parked(
        pg, info, tmp_path, family, monkeypatch, demand):
    """Budget full, db1's only connection in use in worker a: the borrower waits for it
    and says it needs it, so a parks it on give-back and the borrower receives it from
    the queue. Control (no demand ever seen): a keeps it, the borrower asks a for it."""
    monkeypatch.setattr(pool_sharing, 'AWAIT_BUSY', 5.0)
    monkeypatch.setattr(parking_module, 'DEMAND', demand)
    start, peers = family
    shared, make, new_pool = start(budget=2)
    a = peer(peers, tmp_path, info, make)
    pool = new_pool()
    cnx, busy = borrow_while_peer_gives_back(pool, a, info, 0.5)
    assert backend_pid(cnx) == busy and pool.stats.awaited == 1
    if demand:
        assert (pool.stats.unparked, pool.stats.taken) == (1, 0)
    else:
        assert (pool.stats.unparked, pool.stats.taken) == (0, 1)
    cnx.commit()
    pool.give_back(cnx)


@pytest.mark.parametrize('in_request', [True, False])
def test_inside_a_request_a_connection_given_back_serves_the_next_cursor_then_is_parked(
        pg, info, tmp_path, family, in_request):
    """Another worker needed db1 a moment ago (not waiting now). Inside a request
    (deferred_parking, as around Odoo's dispatch) the connection given back stays here
    for the request's next cursor, and is parked when the request ends. Control, outside
    a request: parked at give-back, and the next cursor receives it back from the queue."""
    start, peers = family
    shared, make, new_pool = start()
    other = peer(peers, tmp_path, info, make)
    other.do('borrow', 'db1')               # its demand for db1, then no more
    time.sleep(0.1)
    pool = new_pool()
    with pool_sharing.deferred_parking() if in_request else contextlib.nullcontext():
        cnx = pool.borrow(info('db1'))
        backend = backend_pid(cnx)
        cnx.commit()
        pool.give_back(cnx)
        assert parked(shared) == (0 if in_request else 1)
        again = pool.borrow(info('db1'))
        assert backend_pid(again) == backend
        if in_request:
            assert again is cnx and (pool.stats.reused, pool.stats.unparked) == (1, 0)
        else:
            assert (pool.stats.reused, pool.stats.unparked) == (0, 1)
        again.commit()
        pool.give_back(again)
        assert pool.stats.parked == (0 if in_request else 2)
    assert pool.stats.parked == (1 if in_request else 2) and parked(shared) == 1
    other.do('back', 'db1')


def test_inside_a_request_a_connection_is_parked_at_once_for_a_borrower_waiting_now(
        pg, info, tmp_path, family, monkeypatch):
    """Budget full, worker b waits for db1 (in use here, inside a request): the give-back
    parks it at once and b receives it from the queue, without waiting for the request
    to end."""
    monkeypatch.setattr(pool_sharing, 'AWAIT_BUSY', 5.0)
    start, peers = family
    shared, make, new_pool = start(budget=2)
    b = peer(peers, tmp_path, info, make)
    b.do('borrow', 'db2')
    b.do('back', 'db2')                     # b: an idle db2, the budget's second slot
    pool = new_pool()
    with pool_sharing.deferred_parking():
        cnx = pool.borrow(info('db1'))
        busy = backend_pid(cnx)
        cnx.commit()
        os.write(b._commands, b'borrow db1\n')      # b waits for db1 (answered below)
        time.sleep(0.5)
        pool.give_back(cnx)
        assert pool.stats.parked == 1
        started = time.monotonic()
        assert int(os.read(b._answers, 64)) == busy
        assert time.monotonic() - started < 2.0
        assert b.do('stat', 'unparked') == 1 and b.do('stat', 'awaited') == 1
    b.do('back', 'db1')
