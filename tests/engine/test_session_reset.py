"""db_pool_reset = smart against a real PostgreSQL: what one borrower leaves in
the session never reaches the next borrower of the same connection, without a
reset round trip when nothing was left. Each leak test has a control where the
statement bypasses detection (a plain psycopg2 cursor): the state then leaks,
which shows the test would catch a detection bug."""
import threading

import psycopg2
import psycopg2.extensions
import pytest

from odoo_pool_patch.sessions import session_tracking
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.sessions.session_tracking import TrackingCursor

from testkit import backend_pid

SMART = Settings(reset='smart', reset_every=0, check_after=0)


@pytest.fixture(scope='module')
def other_role(pg):
    pg.sql("DO $$ BEGIN CREATE ROLE dbp_other NOLOGIN; EXCEPTION WHEN duplicate_object "
           "THEN NULL; END $$")
    return 'dbp_other'


def fetch(cnx, query):
    with cnx.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


def leak_then_observe(pool, info, leak, observe, detected=True):
    """Borrower 1 runs ``leak`` and commits; borrower 2 gets the same
    connection and returns what ``observe`` shows."""
    cnx = pool.borrow(info())
    if not detected:
        cnx.cursor_factory = psycopg2.extensions.cursor
    with cnx.cursor() as cur:
        cur.execute(leak)
    cnx.commit()
    cnx.cursor_factory = TrackingCursor
    pool.give_back(cnx)
    again = pool.borrow(info())
    assert again is cnx
    try:
        return fetch(again, observe)
    finally:
        again.rollback()
        pool.give_back(again)


# (feature, statement leaving state, query observing it, value of a clean session)
FEATURES = [
    ('set', 'SET search_path = leaked', 'SHOW search_path', '"$user", public'),
    ('set_config', "SELECT set_config('dbp.leak', 'yes', false)",
     "SELECT coalesce(current_setting('dbp.leak', true), '')", ''),
    ('characteristics', 'SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY',
     'SHOW default_transaction_read_only', 'off'),
    ('role', 'SET ROLE dbp_other', 'SELECT current_user', 'odoo'),
    ('authorization', 'SET SESSION AUTHORIZATION dbp_other', 'SELECT session_user', 'odoo'),
    ('listen', 'LISTEN dbp_leak', 'SELECT count(*) FROM pg_listening_channels()', 0),
    ('advisory', 'SELECT pg_advisory_lock(424242)',
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", 0),
    ('temp', 'CREATE TEMP TABLE dbp_leak (a int)', "SELECT to_regclass('pg_temp.dbp_leak')::text",
     None),
    ('hold', 'DECLARE dbp_leak CURSOR WITH HOLD FOR SELECT 1', 'SELECT count(*) FROM pg_cursors', 0),
    ('prepare', 'PREPARE dbp_leak AS SELECT 1', 'SELECT count(*) FROM pg_prepared_statements', 0),
]


@pytest.mark.parametrize('feature, leak, observe, clean', FEATURES, ids=[f[0] for f in FEATURES])
def test_smart_reset_clears_each_feature_and_control_leaks(pools, info, other_role, feature,
                                                           leak, observe, clean, monkeypatch):
    pool = pools(1, settings=SMART)
    assert leak_then_observe(pool, info, leak, observe) == clean
    assert pool.stats.reset_narrow == 1 and pool.stats.reset_full == 0
    # Control: the same statement hidden from detection (the text, and is_superuser for
    # a role change of this superuser login) leaks into the next borrower.
    monkeypatch.setattr(session_tracking, 'privileges_changed', lambda cnx: False)
    assert leak_then_observe(pool, info, leak, observe, detected=False) != clean


def test_clean_connection_is_reused_without_any_round_trip(pg, pools, info, app):
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info())
    pid = backend_pid(cnx)
    fetch(cnx, 'SELECT 4242 AS dbp_marker')
    cnx.rollback()
    pool.give_back(cnx)
    assert pool.borrow(info()) is cnx
    # The server saw nothing since the marker: no ABORT, no DISCARD ALL.
    last = pg.sql('SELECT query FROM pg_stat_activity WHERE pid = %s', (pid,))[0][0]
    assert last == 'ROLLBACK'
    assert pool.stats.reset_skipped == 1 and pool.stats.reset_full == 0
    pool.give_back(cnx)


def test_always_mode_resets_every_reuse(pg, pools, info):
    pool = pools(1, settings=Settings(reset='always'))
    cnx = pool.borrow(info())
    pid = backend_pid(cnx)
    cnx.rollback()
    pool.give_back(cnx)
    assert pool.borrow(info()) is cnx
    assert pg.sql('SELECT query FROM pg_stat_activity WHERE pid = %s', (pid,))[0][0] == 'DISCARD ALL'
    assert pool.stats.reset_full == 1
    pool.give_back(cnx)


def test_reset_every_n_reuses_and_check_after(pools, info):
    pool = pools(1, settings=Settings(reset='smart', reset_every=3, check_after=0))
    for _ in range(7):
        pool.give_back(pool.borrow(info()))
    assert pool.stats.reset_every == 2 and pool.stats.reset_skipped == 4
    pool = pools(1, settings=Settings(reset='smart', reset_every=0, check_after=0.01))
    cnx = pool.borrow(info())
    pool.give_back(cnx)
    import time
    time.sleep(0.05)
    assert pool.borrow(info()) is cnx
    assert pool.stats.reset_checked == 1
    pool.give_back(cnx)


def test_connection_given_back_inside_a_transaction_is_rolled_back(pools, info):
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info())
    with cnx.cursor() as cur:
        cur.execute('CREATE TABLE dbp_uncommitted (a int)')
    pool.give_back(cnx)             # no rollback, no commit
    again = pool.borrow(info())
    assert again is cnx
    assert again.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert fetch(again, "SELECT to_regclass('dbp_uncommitted')") is None
    assert pool.stats.reset_rollback == 1
    again.rollback()
    pool.give_back(again)


def test_autocommit_left_on_is_reset_and_odoo_cursor_setup_is_not_dirty(pg, pools, info):
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info())
    cnx.autocommit = True
    fetch(cnx, 'SELECT 1')
    pool.give_back(cnx)
    again = pool.borrow(info())
    assert again is cnx and again.autocommit is False
    assert pool.stats.reset_full == 1 and pool.stats.dirty_autocommit == 1
    # What Odoo does on every cursor: not dirty, no reset round trip.
    again.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    again.set_session(readonly=True)
    fetch(again, 'SELECT 1')
    again.rollback()
    pool.give_back(again)
    third = pool.borrow(info())
    assert third.readonly is None and third.isolation_level is None   # client defaults back
    pid = third.info.backend_pid
    assert pg.sql('SELECT query FROM pg_stat_activity WHERE pid = %s', (pid,))[0][0] == 'ROLLBACK'
    assert pool.stats.reset_skipped == 1 and pool.stats.reset_full == 1
    pool.give_back(third)


def test_load_closes_the_connection(pools, info):
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info())
    pid = backend_pid(cnx)
    with cnx.cursor() as cur:
        cur.execute("LOAD 'auto_explain'")
    pool.give_back(cnx)
    assert cnx.closed
    fresh = pool.borrow(info())
    assert backend_pid(fresh) != pid and pool.stats.reset_closed == 1
    pool.give_back(fresh)


def test_role_timeouts_apply_per_transaction_and_never_leak(pools, info):
    settings = Settings(reset='smart', reset_every=0, check_after=0, statement_timeout_http=0.3,
                        statement_timeout_cron=7, idle_in_transaction_timeout_http=5)
    pool = pools(2, settings=settings)
    cnx = pool.borrow(info())
    assert fetch(cnx, 'SHOW statement_timeout') == '300ms'
    assert fetch(cnx, 'SHOW idle_in_transaction_session_timeout') == '5s'
    with pytest.raises(psycopg2.errors.QueryCanceled):
        fetch(cnx, 'SELECT pg_sleep(3)')
    cnx.rollback()
    # Outside our transactions (a plain cursor in autocommit) nothing is left.
    cnx.autocommit = True
    with psycopg2.extensions.cursor(cnx) as cur:
        cur.execute('SHOW statement_timeout')
        assert cur.fetchone()[0] == '0'
    pool.give_back(cnx)
    seen = {}

    def cron():
        conn = pool.borrow(info())
        seen['cron'] = fetch(conn, 'SHOW statement_timeout')
        conn.rollback()
        pool.give_back(conn)
    thread = threading.Thread(target=cron, name='odoo.service.cron.cron0')
    thread.start()
    thread.join()
    assert seen['cron'] == '7s'


class OtherConnection(psycopg2.extensions.connection):
    """Like Odoo's PsycoConnection: a connection class that knows nothing of us."""


def test_foreign_connection_class_is_tracked_too(pools, info):
    from odoo_pool_patch.sessions.session_tracking import SessionTracking
    pool = pools(1, settings=SMART, connection_factory=OtherConnection)
    cnx = pool.borrow(info())
    assert isinstance(cnx, OtherConnection) and isinstance(cnx, SessionTracking)
    pool.give_back(cnx)
    assert leak_then_observe(pool, info, 'LISTEN dbp_leak',
                             'SELECT count(*) FROM pg_listening_channels()') == 0


def test_callproc_of_a_session_lock_is_seen(pools, info):
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info())
    with cnx.cursor() as cur:
        cur.callproc('pg_advisory_lock', [515])
    cnx.commit()
    pool.give_back(cnx)
    again = pool.borrow(info())
    assert fetch(again, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND pid = pg_backend_pid()") == 0
    assert pool.stats.dirty_advisory == 1
    again.rollback()
    pool.give_back(again)
