"""Descriptors from 1024 up, which select() cannot watch: with RLIMIT_NOFILE raised and
1,100 descriptors opened first, every socket the pool, libpq, the exchange and the
parking make gets a number >= 1024, and still borrow, give back, dead-connection
detection, backend-exit detection, exchange and parking all behave (poll(), not
select(): its ValueError was taken as "readable"). Each test checks, as its control,
that select() refuses the descriptors it runs on. Real PostgreSQL, real forked
processes."""
import gc
import os
import resource
import select
import signal
import struct
import time

import pytest

from odoo_pool_patch.shared import parking as parking_module
from odoo_pool_patch.shared import backend_exit
from odoo_pool_patch.pool import sharing as pool_sharing

from testkit import backend_pid
from testkit.peers import borrow_while_peer_gives_back, count, held, make_pool, parked, peer, start_donor, stop


FD_SETSIZE = 1024       # select() raises ValueError from this descriptor number up
FILLERS = 1100


def lowest_free():
    """The number the next descriptor made (socket, received, dup) would get."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def beyond_select(fd):
    """``fd`` is >= 1024 and select() refuses it (what the old code hit)."""
    assert fd >= FD_SETSIZE, fd
    with pytest.raises(ValueError):
        select.select((fd,), (), (), 0)
    return True


@pytest.fixture
def high_fds():
    """RLIMIT_NOFILE raised to 4096 at least, every descriptor number below 1100 taken
    (forked children inherit them): whatever is opened next is >= 1024. All undone after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f'hard RLIMIT_NOFILE {hard} < 4096')
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    gc.collect()                # no object closing a low descriptor later, leaving a hole
    fillers = []
    try:
        while len(fillers) < FILLERS or fillers[-1] < FILLERS:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        assert lowest_free() >= FILLERS
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_borrow_give_back_and_reuse(high_fds, pools, info, pg, app):
    """A healthy idle connection on a high descriptor is reused, not taken for dead."""
    pool = pools(4, timer_period=3600)
    cnx = pool.borrow(info())
    assert beyond_select(cnx.fileno())
    backend = backend_pid(cnx)
    cnx.commit()
    pool.give_back(cnx)
    assert backend_exit.socket_readable(cnx) is False and not backend_exit.is_dead(cnx)
    again = pool.borrow(info())
    assert again is cnx and backend_pid(again) == backend
    assert (pool.stats.reused, pool.stats.opened, pool.stats.dead_replaced) == (1, 1, 0)
    assert pg.count_connections(app) == 1
    pool.give_back(again)


def test_a_dead_idle_connection_is_replaced(high_fds, pools, info, pg, app):
    """An idle connection whose backend was terminated is found dead and replaced."""
    pool = pools(2, timer_period=3600)          # the timer must not hide the case
    cnx = pool.borrow(info())
    assert beyond_select(cnx.fileno())
    backend = backend_pid(cnx)
    cnx.commit()
    pool.give_back(cnx)
    pg.sql('SELECT pg_terminate_backend(%s)', [backend])
    assert pg.wait_until(lambda: pg.count_connections(app) == 0)
    assert pg.wait_until(lambda: backend_exit.socket_readable(cnx))     # the goodbye, seen
    fresh = pool.borrow(info())
    assert fresh is not cnx and beyond_select(fresh.fileno())
    assert backend_pid(fresh) != backend
    assert (pool.stats.dead_replaced, pool.stats.opened) == (1, 2)
    pool.give_back(fresh)


def test_a_budget_slot_is_freed_when_the_backend_exits_not_before(high_fds, pg, info, app,
                                                                  tmp_path):
    """A closed connection's slot waits for its backend to exit (a busy one: a while),
    then is freed; close_all() of an idle one likewise."""
    pool = make_pool(str(tmp_path / 'segment'), exchange=False)
    try:
        busy = pool.borrow(info())
        assert beyond_select(busy.fileno())
        backend = busy.get_backend_pid()
        query = b'SELECT pg_sleep(60)\0'        # Terminate waits behind it
        os.write(busy.fileno(), b'Q' + struct.pack('!i', 4 + len(query)) + query)
        pool.give_back(busy, keep_in_pool=False)
        time.sleep(0.5)                         # many maintenance passes
        assert pool.budget.state.total_held() == 1 and len(pool.books.exiting) == 1
        assert beyond_select(pool.books.exiting[0][0])      # the duplicate watched
        assert pg.count_connections(app) == 1
        pg.sql('SELECT pg_terminate_backend(%s)', [backend])
        assert pg.wait_until(lambda: pool.budget.state.total_held() == 0)
        assert pg.count_connections(app) == 0 and not pool.books.exiting
        cnx = pool.borrow(info('db2'))          # idle, then close_all()
        assert beyond_select(cnx.fileno())
        pool.give_back(cnx)
        assert pool.budget.state.total_held() == 1
        pool.close_all()
        assert pg.wait_until(lambda: pool.budget.state.total_held() == 0)
        assert pg.count_connections(app) == 0       # freed only once gone from the server
    finally:
        pool.shutdown()


def test_a_process_takes_the_idle_connection_of_another(high_fds, pg, info, app, tmp_path):
    """A forked donor (high descriptors too) offers its idle connection; this process
    takes the same server session, reuses it, and frees its slot on close."""
    path = str(tmp_path / 'segment')
    pid, donor_backend = start_donor(path, info('db2'))
    pool = make_pool(path)
    try:
        assert lowest_free() >= FD_SETSIZE          # what the received socket gets
        cnx = pool.borrow(info('db2', application_name=app + '-taker'))
        assert beyond_select(cnx.fileno())
        assert backend_pid(cnx) == donor_backend
        assert (pool.stats.taken, pool.stats.opened) == (1, 0)
        assert held(pool.budget.state) == {pid: 0, os.getpid(): 1}
        cnx.commit()
        pool.give_back(cnx)
        again = pool.borrow(info('db2', application_name=app + '-taker'))
        assert again is cnx and backend_pid(again) == donor_backend
        assert pool.stats.reused == 1
        pool.give_back(again)
        stop(pid)
        assert pg.count_connections(app + '%', 'db2') == 1
        pool.close_all()
        assert pg.wait_until(lambda: pool.budget.state.total_held() == 0)
        assert pg.count_connections(app + '%', 'db2') == 0
    finally:
        stop(pid)
        pool.shutdown()


def test_a_parked_connection_is_received_by_another_process(
        high_fds, pg, info, app, tmp_path, family):  # noqa: F811
    """Worker a parks its db2 connection (worker b needed db2) and is killed: this
    process receives that session from the queue instead of closing it as dead."""
    start, peers = family
    shared, make, new_pool = start()
    a = peer(peers, tmp_path, info, make)
    b = peer(peers, tmp_path, info, make)
    pool = new_pool()
    backend = a.do('borrow', 'db2')
    b.do('borrow', 'db2')
    a.do('back', 'db2')
    assert a.do('stat', 'parked') == 1 and parked(shared) == 1
    a.stop(signal.SIGKILL)
    assert lowest_free() >= FD_SETSIZE          # what the received socket gets
    cnx = pool.borrow(info('db2'))
    assert beyond_select(cnx.fileno())
    assert backend_pid(cnx) == backend == cnx.get_backend_pid()
    assert (pool.stats.unparked, pool.stats.opened) == (1, 0) and parked(shared) == 0
    cnx.commit()
    pool.give_back(cnx)
    assert pg.wait_until(lambda: shared.state.total_held() == 2)
    assert pg.wait_until(lambda: count(pg, app, 'db2') == 2)


def test_a_borrower_waiting_on_the_parking_queue_receives_the_connection(
        high_fds, pg, info, tmp_path, family, monkeypatch):  # noqa: F811
    """Budget full, db1 in use in worker a: the borrower waits on the lot's queue (a high
    descriptor) and receives the connection a parks on give-back."""
    monkeypatch.setattr(pool_sharing, 'AWAIT_BUSY', 5.0)
    monkeypatch.setattr(parking_module, 'DEMAND', 1.0)
    start, peers = family
    shared, make, new_pool = start(budget=2)
    assert all(beyond_select(end.fileno())
               for ends in shared.exchange.parking._pairs for end in ends)
    a = peer(peers, tmp_path, info, make)
    pool = new_pool()
    cnx, busy = borrow_while_peer_gives_back(pool, a, info, 0.5)
    assert beyond_select(cnx.fileno())
    assert backend_pid(cnx) == busy and pool.stats.awaited == 1
    assert (pool.stats.unparked, pool.stats.taken, pool.stats.opened) == (1, 0, 1)
    cnx.commit()
    pool.give_back(cnx)
