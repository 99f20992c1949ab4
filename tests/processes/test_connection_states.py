"""Connection states of the pool's books (``pool.slots``): one function moves a connection
between OUT, IN_USE, IDLE, PARKING, LENDING and CLOSING, and after every step the books,
the slot counts and what the exchange publishes agree with the records' states.

Real pools, real connections, the real parking and exchange of one process (demand for a
database from another process is written in its lot's cells, as that process would)."""
import random
import threading
import time
import traceback

import pytest

from odoo_pool_patch import faults
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.errors import PoolError
from odoo_pool_patch.pool import slots
from odoo_pool_patch.pool.connection_pool import ConnectionPool
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.shared.exchange import attach as attach_exchange

DATABASES = ('db1', 'db2', 'db3')


@pytest.fixture
def shared_pool(tmp_path):
    budget = SharedBudget(ss.SharedState(str(tmp_path / 'state')), 64, role='http')
    assert attach_exchange(budget, Settings()) == ''
    pool = ConnectionPool(16, budget=budget, settings=Settings(reset='smart'), timer_period=3600)
    try:
        yield pool
    finally:
        pool.shutdown()
        budget.exchange.close()


def demand(pool, cnx):
    """Another process (pid 1) wants ``cnx``'s database from now on: give-backs park."""
    parking = pool.budget.exchange.parking
    khash = cnx.pooled.khash
    parking.want(khash)
    for lot in ss.Lot.all(pool.budget.state.cells):
        if lot.hash == khash:
            lot.want_pid, lot.want_ms = 1, int(time.monotonic() * 1000) + 10 ** 9


def no_demand(pool):
    for lot in ss.Lot.all(pool.budget.state.cells):
        lot.want_pid = lot.want_ms = lot.other_ms = 0


def check_books(pool, known, every=True):
    """Books, slot counts and published counts agree with every known connection's state
    (``every``: ``known`` holds all the pool's connections; else a connection booked by a
    thread that has not said so yet may add to the counts)."""
    with pool.books.lock:
        idle = [cnx for stack in pool.books.idle.values() for cnx in stack]
        assert all(pool.books.idle.values()), 'an empty idle stack'
        assert pool.books.n_idle == len(idle)
        for cnx in known:
            state = cnx.pooled.state
            assert (cnx in pool.books.used) == (state == slots.IN_USE), slots.STATES[state]
            assert (cnx in idle) == (state == slots.IDLE), slots.STATES[state]
            if cnx in pool.books.lent:
                assert state in (slots.PARKING, slots.LENDING, slots.CLOSING)
            else:
                assert state not in (slots.PARKING, slots.LENDING)
        travelling = sum(1 for cnx in pool.books.lent if cnx.pooled.state != slots.CLOSING)
        assert pool.books.closing >= travelling
        assert pool.books.count() <= pool.books.maxconn
        published = {}
        for cnx in known:
            record = cnx.pooled
            if record.khash:
                counts = published.setdefault(record.khash, [0, 0])
                counts[0] += record.state == slots.IDLE
                # Given back and on its way to the parking: still in use for others.
                counts[1] += record.state in (slots.IN_USE, slots.PARKING)
        exchange = pool.budget.exchange
        with exchange._lock:
            for khash, counts in published.items():
                now = list(exchange._counts.get(khash, [0, 0]))
                if every:
                    assert now == counts, (khash, counts)
                else:
                    assert now[0] >= counts[0] and now[1] >= counts[1], (khash, counts)


def test_every_step_of_a_random_workload_keeps_books_and_published_counts_agreed(
        shared_pool, info, request):
    """2,000 random steps (borrow, give back, close on give-back, park with demand and
    unpark, lend from idle and take back or give away, close_all of a database, room for
    another database at the local limit): after each, and inside each park, every
    connection seen is in exactly the book its state names and the exchange publishes
    what the states say (idle: IDLE; in use: IN_USE, and PARKING, given back but not yet
    parked)."""
    pool = shared_pool
    rng = random.Random(20261207)
    known, held = set(), []
    moves = set()
    travelling = []

    def mid_park(point):        # (no lock held at these points)
        travelling.append(sum(cnx.pooled.state == slots.PARKING for cnx in known))
        check_books(pool, known)
    faults.arm({'parking.park.before_lock': mid_park, 'parking.park.after_lock': mid_park})
    request.addfinalizer(faults.disarm)
    for step in range(2000):
        action = rng.random()
        if action < 0.4 or not held:
            if len(held) < 12:
                cnx = pool.borrow(info(rng.choice(DATABASES)))
                known.add(cnx)
                held.append(cnx)
                moves.add('borrow')
        elif action < 0.7:
            cnx = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.3:
                demand(pool, cnx)
                moves.add('park')
            pool.give_back(cnx, keep_in_pool=rng.random() > 0.1)
            if rng.random() < 0.5:
                no_demand(pool)
        elif action < 0.8:
            with pool.books.lock:
                candidates = [stack[-1] for stack in pool.books.idle.values()
                              if stack[-1].pooled.khash]
            if candidates:
                khash = rng.choice(candidates).pooled.khash
                cnx = pool.sharing.lend_idle(khash)
                if cnx is not None:
                    assert cnx.pooled.state == slots.LENDING
                    check_books(pool, known)
                    given = rng.random() < 0.5
                    pool.sharing.lent(cnx, given)
                    if given:       # the taker took its budget slot (none here: freed)
                        pool.budget.release()
                    moves.add('given' if given else 'lent back')
        elif action < 0.85:
            database = rng.choice(DATABASES)
            pool.close_all(info(database))
            held = [cnx for cnx in held if cnx.pooled.state == slots.IN_USE]
            moves.add('close_all')
        else:
            pool.books.finish_exits()
        check_books(pool, known)
    faults.disarm()
    for cnx in held:
        pool.give_back(cnx)
    check_books(pool, known)
    assert pool.stats.parked and pool.stats.unparked and pool.stats.given, pool.stats
    assert travelling and all(travelling)     # checked while a connection was PARKING
    assert {'borrow', 'park', 'given', 'lent back', 'close_all'} <= moves


def test_threads_borrowing_giving_back_and_closing_leave_consistent_books(shared_pool, info):
    """Four threads borrow, give back (parking for demand, or closing) and close_all at
    random for 3 s; the books are checked under the pool lock as they run and at the end,
    when nothing is in use and every slot is accounted for."""
    pool = shared_pool
    known, errors, stop = set(), [], time.monotonic() + 3.0
    known_lock = threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                cnx = pool.borrow(info(rng.choice(DATABASES)))
                with known_lock:
                    known.add(cnx)
                if rng.random() < 0.3:
                    demand(pool, cnx)
                elif rng.random() < 0.3:
                    no_demand(pool)
                pool.give_back(cnx, keep_in_pool=rng.random() > 0.05)
                if rng.random() < 0.02:
                    pool.close_all(info(rng.choice(DATABASES)))
        except Exception:           # noqa: BLE001 - reported below
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        with known_lock:
            seen = set(known)
        check_books(pool, seen, every=False)
        time.sleep(0.01)
    assert not errors, errors
    deadline = time.monotonic() + 5
    while pool.books.closing and time.monotonic() < deadline:
        pool.books.finish_exits()
        time.sleep(0.02)
    check_books(pool, known)
    with pool.books.lock:
        assert not pool.books.used and not pool.books.lent and pool.books.closing == 0
        assert pool.books.count() == pool.books.n_idle
    assert pool.stats.parked and pool.stats.unparked


def test_a_closing_connection_never_moves_again(shared_pool, info):
    """CLOSING is terminal: its slot is freed once its backend exited, never reused."""
    pool = shared_pool
    cnx = pool.borrow(info('db1'))
    pool.close_all(info('db1'))
    assert cnx.pooled.state == slots.CLOSING
    with pool.books.lock, pytest.raises(PoolError):
        pool.books.move_locked(cnx, slots.IDLE)
    pool.give_back(cnx)             # ignored: closed by close_all while in use
    assert cnx.pooled.state == slots.CLOSING


def test_a_give_back_racing_close_all_is_ignored(shared_pool, info):
    """close_all() moves a connection in use to CLOSING under the pool lock and closes it
    after releasing the lock; its holder giving it back in between is ignored (it raised
    'does not belong to the pool': the connection was not closed yet)."""
    pool = shared_pool
    cnx = pool.borrow(info('db2'))
    with pool.books.lock:                    # close_all's locked step
        pool.books.move_locked(cnx, slots.CLOSING)
    assert not cnx.closed
    pool.give_back(cnx)
    pool.books.retire([cnx])                 # close_all's close, after the lock
    assert cnx.closed and cnx.pooled.state == slots.CLOSING
    deadline = time.monotonic() + 5
    while pool.books.closing and time.monotonic() < deadline:
        pool.books.finish_exits()
        time.sleep(0.02)
    assert pool.books.count() == 0


# ------------------------------------------------------------------ races the states expose
@pytest.fixture
def make_pool(tmp_path):
    made = []

    def make(maxconn=4):
        budget = SharedBudget(ss.SharedState(str(tmp_path / f'state{len(made)}')), 64,
                              role='http')
        assert attach_exchange(budget, Settings()) == ''
        pool = ConnectionPool(maxconn, budget=budget, settings=Settings(reset='smart'),
                              timer_period=3600)
        made.append(pool)
        return pool
    yield make
    for pool in made:
        pool.shutdown()
        pool.budget.exchange.close()


def settle(pool, pg, app, sessions):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pool.books.finish_exits()
        if not pool.books.closing and pg.count_connections(app) == sessions:
            break
        time.sleep(0.02)
    return pg.count_connections(app)


@pytest.mark.parametrize('taken_by', ['close_all', 'reclaim'])
def test_a_grant_taken_while_checked_is_borrowed_again_within_the_budget(
        make_pool, info, pg, app, taken_by):
    """A reused connection found dead while close_all() (or the reclaim of connections
    closed from outside) takes it: the borrower borrows again, with a slot of its own. It
    opened one in a slot it did not have: one session over the budget for its lifetime."""
    pool = make_pool(maxconn=1)
    pool.give_back(pool.borrow(info('db1')))
    revive = pool.sessions.revive

    def racing_revive(cnx):
        if taken_by == 'close_all':
            pool.close_all()
        else:
            cnx.close()             # (closed from outside)
            pool.maintain()         # the maintenance thread's reclaim
        return revive(cnx)
    pool.sessions.revive = racing_revive
    try:
        cnx = pool.borrow(info('db1'))
    finally:
        del pool.sessions.revive
    assert settle(pool, pg, app, 1) == 1
    assert pool.books.count() <= pool.books.maxconn
    assert pool.budget.held() == 1 == pg.count_connections(app)
    pool.give_back(cnx, keep_in_pool=False)
    assert settle(pool, pg, app, 0) == 0 and pool.budget.held() == 0


class Interrupt(BaseException):
    """Stands for gevent.Timeout or Odoo's SIGXCPU handler."""


def test_a_take_interrupted_while_closing_raises_the_interruption_and_frees_its_slots(
        make_pool, info, pg, app, monkeypatch):
    """A parked connection taken back and found opened before a server restart is closed;
    an interruption inside that close is what the borrower sees (it was replaced by
    'a closing connection cannot move'), and no slot stays counted."""
    from odoo_pool_patch.pool import sharing
    pool = make_pool(maxconn=4)
    cnx = pool.borrow(info('db1'))
    demand(pool, cnx)
    pool.give_back(cnx)
    assert pool.stats.parked == 1
    no_demand(pool)
    monkeypatch.setattr(sharing, 'opened_before_restart', lambda cnx: True)
    close = slots.begin_close
    calls = []

    def interrupted_close(connections):
        fds = close(connections)
        calls.append(1)
        if len(calls) == 1:
            raise Interrupt('inside the close')
        return fds
    monkeypatch.setattr(slots, 'begin_close', interrupted_close)
    with pytest.raises(Interrupt):
        pool.borrow(info('db1'))
    monkeypatch.setattr(slots, 'begin_close', close)
    assert settle(pool, pg, app, 0) == 0
    assert pool.books.closing == 0 and pool.budget.held() == 0


def test_close_all_of_a_database_while_a_give_back_parks_leaves_nothing_parked(
        make_pool, info, pg, app, request):
    """close_all(db) (Odoo's close_db before DROP DATABASE) drains the parking; a
    connection on its way there at that moment landed after the drain and stayed parked,
    its session open on the database being dropped."""
    pool = make_pool(maxconn=4)
    cnx = pool.borrow(info('db1'))
    khash = cnx.pooled.khash
    demand(pool, cnx)
    fired = []

    def close_now(point):
        if not fired:
            fired.append(point)
            pool.close_all(info('db1'))
    faults.arm({'parking.park.before_lock': close_now})
    request.addfinalizer(faults.disarm)
    pool.give_back(cnx)
    faults.disarm()
    assert fired
    assert pool.budget.exchange.parking.count(khash) == 0
    assert settle(pool, pg, app, 0) == 0
