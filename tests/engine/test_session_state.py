"""Statement classification of :mod:`odoo_pool_patch.sessions.session_state` (no server needed)."""
import pytest

from odoo_pool_patch.sessions import session_state as ss
from odoo_pool_patch.sessions.session_state import (ADVISORY, COMMITTED, HOLD, LISTEN, LOAD,
                                                    PREPARE, ROLE, SET, TEMP, UNKNOWN,
                                                    session_kinds)

# Statements as Odoo sends them: none leaves session state behind.
ODOO_MIX = [
    '\n            SELECT "res_partner"."id", "res_partner"."name" FROM "res_partner"\n'
    '            WHERE ("res_partner"."active" = %s) ORDER BY "res_partner"."id" LIMIT 80',
    'INSERT INTO "mail_message" ("author_id", "body", "create_date") VALUES (%s, %s, %s) RETURNING "id"',
    'UPDATE "res_users" SET "login_date" = %s, "write_uid" = %s WHERE id IN %s',
    'DELETE FROM "bus_bus" WHERE "create_date" < %s',
    'WITH RECURSIVE t AS (SELECT 1) SELECT * FROM t',
    'SELECT pg_try_advisory_xact_lock(%s)',
    'SELECT pg_advisory_xact_lock(42)',
    "SELECT set_config('odoo.x', 'y', true)",
    'SET LOCAL statement_timeout = 5000',
    'SET TRANSACTION ISOLATION LEVEL SERIALIZABLE',
    'SET CONSTRAINTS ALL DEFERRED',
    'SAVEPOINT "abc"', 'RELEASE SAVEPOINT "abc"', 'ROLLBACK TO SAVEPOINT "abc"',
    'CREATE TABLE foo (id serial)', 'CREATE INDEX ON foo (id)',
    'DECLARE c CURSOR FOR SELECT 1',
    "SELECT 'pg_advisory_lock(1); SET search_path = x'",
    'SELECT 1 -- pg_advisory_lock(1)',
    "SELECT '; LISTEN x'",
    'NOTIFY imbus',
    "SELECT id FROM ir_cron WHERE name = 'set_config advisory'",
]


# Names inside strings or comments: only sqlparse sees they are not calls.
IN_STRINGS_OR_COMMENTS = {
    "SELECT 'pg_advisory_lock(1); SET search_path = x'", 'SELECT 1 -- pg_advisory_lock(1)',
    "SELECT '; LISTEN x'", "SELECT id FROM ir_cron WHERE name = 'set_config advisory'"}


@pytest.mark.parametrize('query', ODOO_MIX)
def test_ordinary_statements_leave_nothing(query):
    assert session_kinds(query) == 0
    # Without sqlparse (Odoo's own environment): the same, or dirty where unsure.
    if query not in IN_STRINGS_OR_COMMENTS:
        assert ss.confirm_without_sqlparse(query) == 0
    else:
        assert ss.confirm_without_sqlparse(query) != 0


@pytest.mark.parametrize('query, kind', [
    # What may have committed (the request is never run again, the full reset after).
    ('COMMIT', COMMITTED), ('end', COMMITTED), ('/* x */ commit work', COMMITTED),
    ("PREPARE TRANSACTION 'x'", COMMITTED), ("COMMIT PREPARED 'x'", COMMITTED),
    ('INSERT INTO t VALUES (1); COMMIT', COMMITTED),
    ('SET search_path = x', SET),
    ('set statement_timeout to 0', SET),
    ('  Set   TIME ZONE UTC', SET),
    ('/* hint */ SET application_name = \'x\'', SET),
    ('-- comment\nSET work_mem = \'64MB\'', SET),
    ('SET SESSION statement_timeout = 5', SET),
    ('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY', SET),
    ('RESET search_path', SET),
    ('RESET ALL', SET),
    ("SELECT set_config('search_path', 'x', false)", SET),
    ("select SET_CONFIG('a.b', %s, %s)", SET),            # unknown at parse time: session
    ('SET ROLE odoo', ROLE),
    ('SET SESSION AUTHORIZATION odoo', ROLE),
    ('RESET ROLE', ROLE),
    ('LISTEN imbus', LISTEN),
    ('listen "cron_trigger"', LISTEN),
    ('SELECT pg_advisory_lock(1)', ADVISORY),
    ('SELECT PG_TRY_ADVISORY_LOCK(%s)', ADVISORY),
    ('SELECT "pg_advisory_lock_shared"(1)', ADVISORY),
    ('SELECT pg_try_advisory_lock_shared (1, 2)', ADVISORY),
    ('SELECT id FROM queue_job WHERE pg_try_advisory_lock(id) LIMIT 1', ADVISORY),
    ('CREATE TEMP TABLE t (a int)', TEMP),
    ('create local temporary table t as select 1', TEMP),
    ('CREATE OR REPLACE TEMP VIEW v AS SELECT 1', TEMP),
    ('DECLARE c CURSOR WITH HOLD FOR SELECT 1', HOLD),
    ('declare "c" binary no scroll cursor with hold for select 1', HOLD),
    ('PREPARE p (int) AS SELECT $1', PREPARE),
    ("LOAD 'auto_explain'", LOAD),
    ('DO $$ BEGIN PERFORM 1; END $$', UNKNOWN),
    ('SELECT 1; LISTEN x', LISTEN),
    ('SELECT 1; SET search_path = x; SELECT pg_advisory_lock(2)', SET | ADVISORY),
])
def test_session_statements_are_detected(query, kind):
    assert session_kinds(query) == kind
    assert ss.confirm_without_sqlparse(query) == kind
    # The cursors' remembered decision: the same, the first time and from memory
    # (a new str object: as Odoo builds its texts per call).
    ss.forget_decided()
    assert ss.known_kinds(query) == kind
    assert ss.known_kinds(''.join(query)) == kind
    assert query in ss._KNOWN


def test_remembered_decisions_stay_within_their_bound(monkeypatch):
    """known_kinds holds at most KNOWN_MAX_BYTES (estimated: 4 bytes a character of a text
    that is not ASCII, plus each entry's own) and KNOWN_MAX_ENTRIES texts, starts over when
    full, and keeps no text longer than KNOWN_MAX_TEXT (decided each time)."""
    monkeypatch.setattr(ss, 'KNOWN_MAX_BYTES', 4000)
    ss.forget_decided()
    try:
        def held():
            return sum(len(t) * (1 if t.isascii() else 4) + ss._ENTRY_BYTES for t in ss._KNOWN)
        for number in range(200):
            query = f'SELECT "res_partner"."id" FROM "res_partner" WHERE id = {number}'
            assert ss.known_kinds(query) == 0
            assert ss._KNOWN_SIZE[0] == held() <= 4000
        assert 0 < len(ss._KNOWN) < 200
        for number in range(50):     # 4 bytes a character: fewer of them fit
            query = f'SELECT name FROM res_partner WHERE name = \'\U0001F600{number}\''
            assert ss.known_kinds(query) == 0
            assert ss._KNOWN_SIZE[0] == held() <= 4000
        monkeypatch.setattr(ss, 'KNOWN_MAX_BYTES', 1 << 20)
        monkeypatch.setattr(ss, 'KNOWN_MAX_ENTRIES', 10)
        for number in range(25):
            ss.known_kinds(f'SELECT {number}')
            assert len(ss._KNOWN) <= 10
        long_set = 'SET search_path = x; SELECT ' + 'x' * ss.KNOWN_MAX_TEXT
        assert ss.known_kinds(long_set) == SET and long_set not in ss._KNOWN
    finally:
        ss.forget_decided()


def test_only_plain_strings_are_remembered():
    """A str subclass may compare equal to any text: remembered, it would answer for a
    later plain text (a SET ROLE decided as the subclass's 0). Not remembered, never asked."""
    class Anything(str):
        def __hash__(self):
            return hash('SET ROLE postgres')

        def __eq__(self, other):
            return True
    ss.forget_decided()
    try:
        assert ss.known_kinds(Anything('SELECT 1')) == 0
        assert not ss._KNOWN
        assert ss.known_kinds('SET ROLE postgres') == ROLE
    finally:
        ss.forget_decided()


def test_narrow_reset_clears_role_first_and_one_statement_per_kind():
    sql = ss.narrow_reset(SET | ROLE | LISTEN | ADVISORY | TEMP | HOLD | PREPARE)
    assert sql.startswith('RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL')
    for part in ('UNLISTEN *', 'pg_advisory_unlock_all()', 'DISCARD TEMP', 'CLOSE ALL',
                 'DEALLOCATE ALL'):
        assert part in sql
    assert ss.narrow_reset(LISTEN) == 'UNLISTEN *'
    assert ss.names(SET | LISTEN) == ['set', 'listen']
