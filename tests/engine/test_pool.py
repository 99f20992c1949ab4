"""The per-process engine against a real PostgreSQL: Odoo's pool contract and ours."""
import logging
import os
import threading
import time

import psycopg2
import pytest

from psycopg2.pool import PoolError

from odoo_pool_patch.errors import PoolTimeout
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool, PooledConnection

from testkit import backend_pid


def test_reuse_returns_same_connection_and_server_session(pools, info, pg, app):
    pool = pools(4)
    cnx = pool.borrow(info())
    assert isinstance(cnx, PooledConnection)
    pid = backend_pid(cnx)
    pool.give_back(cnx)
    again = pool.borrow(info())
    assert again is cnx and backend_pid(again) == pid
    assert pg.count_connections(app) == 1
    pool.give_back(again)


def test_two_borrows_get_two_connections(pools, info):
    pool = pools(4)
    first, second = pool.borrow(info()), pool.borrow(info())
    assert first is not second and backend_pid(first) != backend_pid(second)
    assert 'port=' in first.dsn            # Odoo's test_db_cursor checks this
    pool.give_back(first)
    pool.give_back(second)


def test_lifo_reuses_the_connection_freed_last(pools, info):
    pool = pools(4)
    a, b, c = (pool.borrow(info()) for _ in range(3))
    for cnx in (a, c, b):
        pool.give_back(cnx)
    assert pool.borrow(info()) is b
    assert pool.borrow(info()) is c
    assert pool.borrow(info()) is a


def test_dsn_matching_ignores_password_and_aliases_dbname(pools, info):
    pool = pools(4)
    cnx = pool.borrow(info())
    pool.give_back(cnx)
    other = dict(info(), password='different')
    other['dbname'] = other.pop('database')
    assert pool.borrow(other) is cnx
    assert pool._dsn_equals(info(), other)
    assert pool._dsn_equals(cnx.dsn, info())          # libpq string against dict
    assert not pool._dsn_equals(info('db1'), info('db2'))


def test_other_database_gets_other_connection(pools, info):
    pool = pools(4)
    cnx = pool.borrow(info('db1'))
    pool.give_back(cnx)
    other = pool.borrow(info('db2'))
    assert other is not cnx
    with other.cursor() as cur:
        cur.execute('SELECT current_database()')
        assert cur.fetchone()[0] == 'db2'


def test_reused_connection_is_reset(pools, info):
    pool = pools(2)
    cnx = pool.borrow(info())
    cnx.autocommit = True
    with cnx.cursor() as cur:
        cur.execute("SET search_path TO pg_catalog")
        cur.execute("CREATE TEMP TABLE leftover (x int)")
    cnx.autocommit = False
    pool.give_back(cnx)
    cnx = pool.borrow(info())
    with cnx.cursor() as cur:
        cur.execute('SHOW search_path')
        assert cur.fetchone()[0] == '"$user", public'
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = 'leftover'")
        assert cur.fetchone()[0] == 0


def test_keep_in_pool_false_closes(pools, info, pg, app):
    pool = pools(4)
    cnx = pool.borrow(info())
    pool.give_back(cnx, keep_in_pool=False)
    assert cnx.closed
    assert pg.wait_until(lambda: pg.count_connections(app) == 0)
    assert pool.snapshot()['idle'] == 0 and pool.snapshot()['in_use'] == 0


def test_give_back_of_foreign_connection_raises(pools, info, pg):
    pool = pools(2)
    foreign = psycopg2.connect(**info())
    try:
        with pytest.raises(PoolError, match='does not belong to the pool'):
            pool.give_back(foreign)
    finally:
        foreign.close()


def test_close_all_by_dict_and_string_dsn(pools, info, pg, app):
    pool = pools(6)
    held = [pool.borrow(info('db1')), pool.borrow(info('db2')), pool.borrow(info('db3'))]
    for cnx in held:
        pool.give_back(cnx)
    assert pg.count_connections(app) == 3
    pool.close_all(info('db1'))                              # dict form
    assert held[0].closed and not held[1].closed
    pool.close_all(held[1].dsn)                              # libpq string form
    assert held[1].closed and not held[2].closed
    assert pg.wait_until(lambda: pg.count_connections(app) == 1)
    pool.close_all()
    assert held[2].closed
    assert pg.wait_until(lambda: pg.count_connections(app) == 0)


def test_close_all_closes_in_use_and_later_give_back_is_ignored(pools, info):
    pool = pools(2)
    cnx = pool.borrow(info())
    pool.close_all()
    assert cnx.closed
    pool.give_back(cnx)          # stock Cursor._close still calls give_back
    assert pool.snapshot()['in_use'] == 0


def test_connection_closed_from_outside_frees_its_slot(pools, info):
    """Odoo 19's cron closes cr._cnx itself and never gives it back."""
    pool = pools(1, settings=Settings(wait_timeout=5))
    cnx = pool.borrow(info())
    cnx.close()
    replacement = pool.borrow(info())           # would time out if the slot leaked
    assert replacement is not cnx and not replacement.closed


def test_leaked_connection_is_reclaimed(pools, info, pool_log):
    pool = pools(1, settings=Settings(wait_timeout=5))
    cnx = pool.borrow(info())
    with cnx.cursor() as cur:
        cur.execute('SELECT 1')                  # left inside a transaction
    cnx.leaked = True                            # what Odoo's Cursor.__del__ does
    again = pool.borrow(info())
    assert again is cnx and not hasattr(cnx, 'leaked')
    assert again.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert 'Free leaked connection' in pool_log.text


def test_dead_idle_connection_replaced_after_terminate(pools, info, pg, app):
    pool = pools(2, timer_period=3600)           # the timer must not hide the case
    cnx = pool.borrow(info())
    pool.give_back(cnx)
    assert pg.terminate(app) == 1
    time.sleep(0.2)
    fresh = pool.borrow(info())
    assert fresh is not cnx
    with fresh.cursor() as cur:
        cur.execute('SELECT 1')
        assert cur.fetchone() == (1,)
    assert pool.stats.dead_replaced == 1


def test_dead_idle_connections_replaced_after_server_restart(pools, info, pg, app):
    pool = pools(4, timer_period=3600)
    held = [pool.borrow(info()) for _ in range(3)]
    for cnx in held:
        pool.give_back(cnx)
    pg.restart()
    for _ in range(3):
        cnx = pool.borrow(info())
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')
        pool.give_back(cnx)
    assert pool.stats.dead_replaced >= 1
    pool.maintain()                              # the timer's pass finds the others dead
    assert all(c.closed for c in held)
    assert pool.snapshot()['idle'] == 1


def test_timer_drops_terminated_idle_connection(pools, info, pg, app):
    pool = pools(2, timer_period=0.1)
    cnx = pool.borrow(info())
    pool.give_back(cnx)
    pg.terminate(app)
    assert pg.wait_until(lambda: pool.snapshot()['idle'] == 0, timeout=5)
    assert pool.stats.closed_dead == 1


def test_idle_eviction_runs_on_the_timer_without_borrows(pools, info, pg, app):
    pool = pools(4, settings=Settings(idle_timeout=0.5), timer_period=0.1)
    held = [pool.borrow(info()) for _ in range(3)]
    for cnx in held:
        pool.give_back(cnx)
    assert pg.count_connections(app) == 3
    assert pg.wait_until(lambda: pg.count_connections(app) == 0, timeout=5)
    assert pool.stats.closed_idle == 3


def test_a_pool_with_a_shorter_timer_period_is_maintained_at_its_pace(info, pg):
    """One maintenance thread serves every pool of the process: a pool registered after a
    pass scheduled at a long period's pace is still maintained at its own period. In a
    child, for a maintenance thread of its own whose first pass sees the slow pool alone."""
    pid = os.fork()
    if pid == 0:                            # pragma: no cover - child
        ok = False
        try:
            slow = ConnectionPool(2, timer_period=3600)
            slow.give_back(slow.borrow(info()))     # starts the thread: a pass, slow alone
            time.sleep(0.3)
            fast = ConnectionPool(2, settings=Settings(idle_timeout=0.3), timer_period=0.1)
            fast.give_back(fast.borrow(info('db2')))
            ok = pg.wait_until(lambda: fast.stats.closed_idle == 1, timeout=5) and \
                slow.stats.closed_idle == 0
            fast.shutdown()
            slow.shutdown()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_idle_eviction_keeps_recently_used(pools, info, pg, app):
    pool = pools(4, settings=Settings(idle_timeout=1.0), timer_period=0.1)
    a, b = pool.borrow(info()), pool.borrow(info())
    pool.give_back(a)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:             # b is used again and again
        pool.give_back(b)
        b = pool.borrow(info())
        time.sleep(0.1)
    assert a.closed and not b.closed
    pool.give_back(b)


def test_max_lifetime_recycles_idle_connection_on_the_timer(pools, info, pg, app):
    pool = pools(4, settings=Settings(max_lifetime=0.6, idle_timeout=0), timer_period=0.1)
    cnx = pool.borrow(info())
    first_pid = backend_pid(cnx)
    pool.give_back(cnx)
    assert pg.wait_until(lambda: pg.count_connections(app) == 0, timeout=5)
    assert pool.stats.closed_lifetime == 1
    fresh = pool.borrow(info())
    assert backend_pid(fresh) != first_pid


def test_expired_connection_in_use_is_closed_on_give_back(pools, info):
    pool = pools(2, settings=Settings(max_lifetime=0.2), timer_period=3600)
    cnx = pool.borrow(info())
    time.sleep(0.3)
    pool.give_back(cnx)
    assert cnx.closed


def test_lifetime_has_jitter(pools, info):
    pool = pools(10, settings=Settings(max_lifetime=1000))
    held = [pool.borrow(info()) for _ in range(8)]
    spans = {round(c.pooled.expires - c.pooled.born, 3) for c in held}
    assert len(spans) > 1 and all(900 <= s <= 1000 for s in spans)
    for cnx in held:
        pool.give_back(cnx)


def test_full_pool_closes_idle_of_other_database_instead_of_failing(pools, info):
    pool = pools(2, settings=Settings(wait_timeout=0))
    a, b = pool.borrow(info('db1')), pool.borrow(info('db2'))
    pool.give_back(a)
    c = pool.borrow(info('db3'))                 # room made by closing a
    assert a.closed and not b.closed
    pool.give_back(b)
    pool.give_back(c)


def test_wait_then_succeed_when_freed_in_time(pools, info):
    pool = pools(1, settings=Settings(wait_timeout=10))
    cnx = pool.borrow(info())
    threading.Timer(0.5, pool.give_back, [cnx]).start()
    start = time.monotonic()
    again = pool.borrow(info())
    assert again is cnx
    assert time.monotonic() - start >= 0.4
    assert pool.stats.waits == 1 and pool.stats.timeouts == 0


def test_waiter_for_other_database_gets_a_new_connection(pools, info):
    pool = pools(1, settings=Settings(wait_timeout=10))
    cnx = pool.borrow(info('db1'))
    threading.Timer(0.3, pool.give_back, [cnx]).start()
    other = pool.borrow(info('db2'))
    assert other is not cnx and cnx.closed
    with other.cursor() as cur:
        cur.execute('SELECT current_database()')
        assert cur.fetchone()[0] == 'db2'


def holder_function(pool, connection_info):
    return pool.borrow(connection_info)


def test_wait_then_pool_error_names_limit_wait_and_holders(pools, info):
    pool = pools(2, settings=Settings(wait_timeout=0.5))
    holder_function(pool, info('db1'))
    holder_function(pool, info('db2'))
    start = time.monotonic()
    with pytest.raises(PoolTimeout) as excinfo:
        pool.borrow(info('db3'))
    assert time.monotonic() - start >= 0.45
    message = str(excinfo.value)
    assert isinstance(excinfo.value, PoolError)
    assert 'db_maxconn = 2' in message and 'after waiting 0.5 s' in message
    assert "database 'db1'" in message and "database 'db2'" in message
    assert 'test_pool.py' in message and 'holder_function' in message
    assert threading.current_thread().name in message
    assert pool.stats.timeouts == 1


def test_wait_timeout_zero_fails_at_once_like_stock(pools, info):
    pool = pools(1, settings=Settings(wait_timeout=0))
    pool.borrow(info())
    start = time.monotonic()
    with pytest.raises(PoolError, match='The Connection Pool Is Full'):
        pool.borrow(info())
    assert time.monotonic() - start < 0.5


def test_waiters_are_served_first_come_first_served(pools, info, pg, app):
    pool = pools(1, settings=Settings(wait_timeout=20))
    cnx = pool.borrow(info())
    order, threads = [], []

    def waiter(number):
        got = pool.borrow(info())
        order.append(number)
        time.sleep(0.02)
        pool.give_back(got)

    for number in range(6):
        thread = threading.Thread(target=waiter, args=(number,))
        thread.start()
        threads.append(thread)
        assert pg.wait_until(lambda: pool.snapshot()['waiting'] == number + 1, timeout=5)
    pool.give_back(cnx)
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))
    assert pg.count_connections(app) <= 1


def test_many_threads_never_exceed_limit_and_never_fail(pools, info, pg, app):
    pool = pools(3, settings=Settings(wait_timeout=30))
    errors, peak = [], []

    def work(number):
        try:
            for _ in range(15):
                cnx = pool.borrow(info(('db1', 'db2', 'db3')[number % 3]))
                with cnx.cursor() as cur:
                    cur.execute('SELECT pg_sleep(0.005)')
                cnx.rollback()
                pool.give_back(cnx)
        except Exception as exc:     # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    def sample():
        while any(t.is_alive() for t in threads):
            peak.append(pg.count_connections(app))
            time.sleep(0.02)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    sample()
    assert not errors
    assert max(peak) <= 3
    snap = pool.snapshot()
    assert snap['in_use'] == 0 and snap['waiting'] == 0 and snap['opening'] == 0


def test_connect_failure_frees_the_slot(pools, info, pg):
    pool = pools(1, settings=Settings(wait_timeout=1))
    with pytest.raises(psycopg2.OperationalError):
        pool.borrow(info('no_such_database'))
    cnx = pool.borrow(info())                    # the slot was given back
    pool.give_back(cnx)


def test_leak_warning_logged_once_with_borrow_site(pools, info, pool_log):
    pool = pools(2, settings=Settings(leak_warn_after=0.3), timer_period=0.1)
    cnx = holder_function(pool, info())
    time.sleep(1.0)
    warnings = [r for r in pool_log.records if 'db_pool_leak_warn_after' in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING and warnings[0].name.startswith('odoo.sql_db')
    assert 'holder_function' in message and "database 'db1'" in message
    pool.give_back(cnx)


def test_repr_and_readonly_like_stock(pools, info):
    pool = pools(5, readonly=True)
    cnx = pool.borrow(info())
    assert pool.readonly is True and pool.books.maxconn == 5
    assert repr(pool) == 'ConnectionPool(read-only;used=1/count=1/max=5)'
    pool.give_back(cnx)
    assert repr(pools(3)) == 'ConnectionPool(read/write;used=0/count=0/max=3)'


def test_uri_connection_info(pools, pg, app):
    pool = pools(2)
    uri = {'dsn': f'postgresql://odoo@127.0.0.1:{pg.port}/db2', 'application_name': app}
    cnx = pool.borrow(uri)
    pool.give_back(cnx)
    assert pool.borrow(uri) is cnx
    pool.give_back(cnx)
    pool.close_all(uri)
    assert cnx.closed


def test_maintenance_pass_after_every_kind_of_reuse(pools, info):
    """The timer's pass must work whatever the books look like (it runs unattended)."""
    pool = pools(4, settings=Settings(idle_timeout=0.01), timer_period=3600)
    a = pool.borrow(info('db1'))
    pool.give_back(a)
    a = pool.borrow(info('db1'))              # db1's idle stack is empty again
    b = pool.borrow(info('db2'))
    pool.give_back(b)
    time.sleep(0.05)
    pool.maintain()
    assert b.closed and not a.closed
    pool.give_back(a)
    assert pool.snapshot()['idle'] == 1
