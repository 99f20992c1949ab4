"""No role or session authorization survives a reset, in the same process or after
the connection moved to another one (real PostgreSQL, real forked processes).

``RESET ALL`` does not reset ``role`` nor ``session_authorization``, so every
spelling that changes them must lead to ``RESET SESSION AUTHORIZATION; RESET
ROLE`` (or the full reset). Each spelling runs twice: with the pool as it is
(``current_user`` and ``session_user`` are the pool's login role again), and
as a control with the pool as it was before the fix (``legacy``: a settings
reset without the role's, no look into ``PREPARE`` bodies nor at ``CALL``, no
``is_superuser`` check), where the role leaks to the next borrower; spellings
the old code already handled have the control of the existing reset tests
instead (the statement hidden from detection), so that every row can fail.
"""
import os
import signal

import psycopg2.extensions
import pytest

from odoo_pool_patch.sessions import session_state, session_tracking
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.sessions.session_tracking import TrackingCursor

from testkit.peers import make_pool, stop


SMART = Settings(reset='smart', reset_every=0, check_after=0)
LOGIN, TARGET, SUPER = 'dbp_priv_login', 'dbp_priv_target', 'odoo'


@pytest.fixture(scope='module')
def roles(pg):
    """An ordinary login role, member of a role it can switch to; a procedure and a
    function that switch to it in every test database."""
    pg.sql(f"DO $$ BEGIN CREATE ROLE {TARGET} NOLOGIN; EXCEPTION WHEN duplicate_object "
           f"THEN NULL; END $$")
    pg.sql(f"DO $$ BEGIN CREATE ROLE {LOGIN} LOGIN NOSUPERUSER; EXCEPTION WHEN "
           f"duplicate_object THEN NULL; END $$")
    pg.sql(f'GRANT {TARGET} TO {LOGIN}')
    pg.sql("DO $$ BEGIN CREATE ROLE dbp_priv_super SUPERUSER NOLOGIN; EXCEPTION WHEN "
           "duplicate_object THEN NULL; END $$")
    for database in ('db1', 'db2', 'db3'):
        pg.sql('CREATE OR REPLACE FUNCTION dbp_priv_other_super() RETURNS void LANGUAGE '
               'plpgsql AS $$ BEGIN SET SESSION AUTHORIZATION dbp_priv_super; END $$',
               dbname=database)
        pg.sql(f'CREATE OR REPLACE PROCEDURE dbp_priv_proc() LANGUAGE plpgsql AS '
               f'$$ BEGIN SET ROLE {TARGET}; END $$', dbname=database)
        pg.sql(f'CREATE OR REPLACE FUNCTION dbp_priv_become() RETURNS void LANGUAGE plpgsql '
               f'AS $$ BEGIN SET ROLE {TARGET}; END $$', dbname=database)
        pg.sql(f'GRANT EXECUTE ON PROCEDURE dbp_priv_proc() TO {LOGIN}', dbname=database)


# (name, login role, statements [(sql, params)], the old code leaked it)
SPELLINGS = [
    ('set_role', LOGIN, [(f'SET ROLE {TARGET}', None)], False),
    ('set_session_role', LOGIN, [(f'SET SESSION ROLE {TARGET}', None)], False),
    ('set_quoted_role', LOGIN, [(f'SET "role" TO {TARGET}', None)], True),
    ('set_config_role', LOGIN, [(f"SELECT set_config('role', '{TARGET}', false)", None)], True),
    ('set_config_parameters', LOGIN, [('SELECT set_config(%s, %s, %s)',
                                       ('role', TARGET, False))], True),
    ('prepare_execute', LOGIN, [(f"PREPARE dbp_priv AS SELECT set_config('role', '{TARGET}', "
                                 f"false)", None), ('EXECUTE dbp_priv', None)], True),
    ('do_block', LOGIN, [(f'DO $$ BEGIN SET ROLE {TARGET}; END $$', None)], False),
    ('call_procedure', LOGIN, [('CALL dbp_priv_proc()', None)], True),
    ('session_authorization', SUPER, [(f'SET SESSION AUTHORIZATION {LOGIN}', None)], False),
    ('set_session_authorization', SUPER, [(f'SET session_authorization = {LOGIN}', None)], True),
    ('set_config_session_authorization', SUPER,
     [(f"SELECT set_config('session_authorization', '{LOGIN}', false)", None)], True),
    # Not visible in the text: caught by is_superuser, which the server reports.
    ('user_function', SUPER, [('SELECT dbp_priv_become()', None)], True),
]
IDS = [spelling[0] for spelling in SPELLINGS]


def _legacy_narrow_reset(mask):
    return '; '.join(sql for bit, sql in session_state._NARROW if mask & bit)


def _legacy_kinds(query):
    head = query.lstrip().split(None, 1)[0].upper()
    if head == 'CALL':
        return 0
    if head == 'PREPARE':
        return session_state.PREPARE
    return session_state.session_kinds(query)


@pytest.fixture
def legacy(monkeypatch):
    """The pool as it was before roles were reset with every setting."""
    monkeypatch.setattr(session_state, 'narrow_reset', _legacy_narrow_reset)
    monkeypatch.setattr(session_tracking, 'session_kinds', _legacy_kinds)
    monkeypatch.setattr(session_tracking, 'known_kinds', _legacy_kinds)
    monkeypatch.setattr(session_tracking, 'privileges_changed', lambda cnx: False)


def run_leak(cnx, statements, detected=True):
    """Run ``statements`` on a borrowed connection and commit (a callable statement is
    called with the cursor)."""
    if not detected:
        cnx.cursor_factory = psycopg2.extensions.cursor
    with cnx.cursor() as cur:
        for sql, params in statements:
            if callable(sql):
                sql(cur)
            else:
                cur.execute(sql, params)
    cnx.commit()
    cnx.cursor_factory = TrackingCursor


def identity(cnx):
    with cnx.cursor() as cur:
        cur.execute('SELECT current_user, session_user, pg_backend_pid()')
        row = cur.fetchone()
    cnx.commit()
    return row


def same_process(pool, connection_info, statements, detected=True):
    """(current_user, session_user) of the next borrower of the connection used."""
    cnx = pool.borrow(connection_info)
    run_leak(cnx, statements, detected)
    pool.give_back(cnx)
    again = pool.borrow(connection_info)
    assert again is cnx
    try:
        return identity(again)[:2]
    finally:
        pool.give_back(again)


@pytest.mark.parametrize('name, login, statements, old_leak', SPELLINGS, ids=IDS)
def test_the_same_process_reuses_the_connection_as_its_login_role(
        roles, pools, info, name, login, statements, old_leak, request):
    connection_info = info('db1', user=login)
    assert same_process(pools(1, settings=SMART), connection_info, statements) == (login, login)
    # Controls: the leak shows without the fix, or with the statement unseen.
    if old_leak:
        request.getfixturevalue('legacy')
        leaked = same_process(pools(1, settings=SMART), connection_info, statements)
    else:
        pool = pools(1, settings=SMART)
        session_tracking.privileges_changed, saved = (lambda cnx: False), session_tracking.privileges_changed
        try:
            leaked = same_process(pool, connection_info, statements, detected=False)
        finally:
            session_tracking.privileges_changed = saved
    assert leaked != (login, login)


def leaking_donor(path, connection_info, statements, detected, ready):
    """A child whose pool's connection was used with ``statements``, then reused once
    (the reset runs then) and left idle, clean to its eyes: it says the backend pid
    on ``ready`` and waits for SIGTERM."""
    pid = os.fork()
    if pid:
        return pid
    try:                                    # pragma: no cover - child
        pool = make_pool(path)
        cnx = pool.borrow(connection_info)
        run_leak(cnx, statements, detected)
        pool.give_back(cnx)
        again = pool.borrow(connection_info)
        number = identity(again)[2]
        pool.give_back(again)
        os.write(ready, str(number).encode())
        signal.sigwait({signal.SIGTERM})
        os._exit(0)
    finally:
        os._exit(1)


def after_hand_over(tmp_path, connection_info, statements, detected=True):
    """(current_user, session_user) in this process of the connection another process
    used with ``statements``; it must have moved (same backend)."""
    path = str(tmp_path / f'segment-{len(os.listdir(tmp_path))}')
    read_end, write_end = os.pipe()
    pid = leaking_donor(path, connection_info, statements, detected, write_end)
    os.close(write_end)
    donor_backend = int(os.read(read_end, 32) or 0)
    os.close(read_end)
    pool = make_pool(path)
    try:
        assert donor_backend, 'the donor failed'
        cnx = pool.borrow(connection_info)
        user, session_user, backend = identity(cnx)
        assert backend == donor_backend and pool.stats.taken == 1     # it did move
        pool.give_back(cnx)
        return user, session_user
    finally:
        stop(pid)
        pool.shutdown()


@pytest.mark.parametrize('name, login, statements, old_leak', SPELLINGS, ids=IDS)
def test_a_connection_moved_to_another_process_arrives_as_the_login_role(
        roles, pg, info, tmp_path, name, login, statements, old_leak, request):
    connection_info = info('db2', user=login)
    assert after_hand_over(tmp_path, connection_info, statements) == (login, login)
    if old_leak:
        request.getfixturevalue('legacy')
        leaked = after_hand_over(tmp_path, connection_info, statements)
    else:
        saved = session_tracking.privileges_changed
        session_tracking.privileges_changed = lambda cnx: False
        try:
            leaked = after_hand_over(tmp_path, connection_info, statements, detected=False)
        finally:
            session_tracking.privileges_changed = saved
    assert leaked != (login, login)


def test_set_local_role_ends_with_its_transaction_without_a_reset(roles, pools, info):
    pool = pools(1, settings=SMART)
    connection_info = info('db1', user=LOGIN)
    assert same_process(pool, connection_info, [(f'SET LOCAL ROLE {TARGET}', None)]) == \
        (LOGIN, LOGIN)
    assert pool.stats.reset_skipped == 1 and pool.stats.reset_narrow == 0
    # Given back inside its transaction: rolled back, the role with it.
    cnx = pool.borrow(connection_info)
    with cnx.cursor() as cur:
        cur.execute(f'SET LOCAL ROLE {TARGET}')
    pool.give_back(cnx)
    again = pool.borrow(connection_info)
    assert identity(again)[:2] == (LOGIN, LOGIN)
    pool.give_back(again)


def test_a_settings_reset_always_resets_the_role():
    for mask in (session_state.SET, session_state.SET | session_state.LISTEN):
        assert session_state.narrow_reset(mask).startswith(
            'RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL')
    assert 'ROLE' not in session_state.narrow_reset(session_state.LISTEN)


def _copy(cur):
    import io
    cur.copy_expert(f"COPY (SELECT set_config('role', '{TARGET}', false)) TO STDOUT",
                    io.StringIO())


def _as_is(cur):
    cur.execute('%s', [psycopg2.extensions.AsIs(f'SET ROLE {TARGET}')])


def _foreign_cursor(cur):
    import psycopg2.extras
    with cur.connection.cursor(cursor_factory=psycopg2.extras.DictCursor) as other:
        other.execute(f'SET ROLE {TARGET}')


# Texts sqlparse or the regular expressions once read otherwise than PostgreSQL, and
# entry points that bypassed the cursor's execute (found by a review of the fix).
MISREAD = [
    ('unicode_escape_name', LOGIN,
     f"SELECT U&\"set\\005fconfig\"('role', '{TARGET}', false)"),
    ('backslash_ends_the_string', LOGIN, f"SELECT '\\'; SET ROLE {TARGET}; --'"),
    ('nested_comment', LOGIN, f'/* a /* b */ c */ SET ROLE {TARGET}'),
    ('comment_before_parenthesis', LOGIN, f"SELECT set_config/**/('role', '{TARGET}', false)"),
    ('comment_fakes_local', LOGIN, f"SELECT set_config('role', '{TARGET}' /*, true)*/, false)"),
    ('line_comment_fakes_local', LOGIN,
     f"SELECT set_config('role', '{TARGET}' -- , true)\n, false)"),
    ('copy_expert', LOGIN, _copy),
    ('as_is_parameter', LOGIN, _as_is),
    ('foreign_cursor_class', LOGIN, _foreign_cursor),
    ('superuser_to_superuser', SUPER, 'SELECT dbp_priv_other_super()'),
]


@pytest.mark.parametrize('parser', ['sqlparse', 'regular_expressions'])
@pytest.mark.parametrize('name, login, statement', MISREAD, ids=[m[0] for m in MISREAD])
def test_texts_parsers_misread_and_other_entry_points_are_reset(
        roles, pools, info, monkeypatch, parser, name, login, statement):
    if parser == 'regular_expressions':
        monkeypatch.setitem(__import__('sys').modules, 'sqlparse', None)   # ImportError
    session_state.forget_decided()
    try:
        connection_info = info('db1', user=login)
        assert same_process(pools(1, settings=SMART), connection_info, [(statement, None)]) \
            == (login, login)
    finally:
        session_state.forget_decided()


def test_a_leaked_connection_reclaimed_is_checked_too(roles, pools, info):
    """A connection Odoo flagged ``leaked`` goes back idle through the reclaim path."""
    pool = pools(1, settings=SMART)
    cnx = pool.borrow(info('db1'))
    with cnx.cursor() as cur:
        cur.execute('SELECT dbp_priv_become()')      # a user function: SET ROLE
    cnx.commit()
    cnx.leaked = True
    pool.maintain()
    again = pool.borrow(info('db1'))
    assert again is cnx and identity(again)[:2] == (SUPER, SUPER)
    pool.give_back(again)
