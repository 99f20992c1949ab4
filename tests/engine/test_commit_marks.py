"""What may commit is noted for the request retry (odoo_pool_patch.sessions.commit_marks,
read by request_retry): each way a transaction can end committed on a pool connection
bumps the thread's mark, nothing else does (real PostgreSQL). The request retry itself is tested
inside Odoo (addons/db_pooling/tests/test_request_retry.py)."""
import threading

import psycopg2
import psycopg2.extras
import pytest

from odoo_pool_patch.sessions import commit_marks


def marks():
    return commit_marks.count()


@pytest.fixture
def cnx(pools, info):
    pool = pools()
    connection = pool.borrow(info())
    yield connection
    pool.give_back(connection, keep_in_pool=False)


def statement(sql):
    def run(cnx):
        with cnx.cursor() as cur:
            cur.execute(sql)
    return run


@pytest.mark.parametrize('what, action', [
    ('commit()', lambda cnx: (statement('SELECT 1')(cnx), cnx.commit())),
    ('COMMIT as SQL', statement('SELECT 1; COMMIT')),
    ('END as SQL', statement('END')),
    ('autocommit = True', lambda cnx: setattr(cnx, 'autocommit', True)),
    ('set_session(autocommit=True)', lambda cnx: cnx.set_session(autocommit=True)),
    ('set_isolation_level(0)', lambda cnx: cnx.set_isolation_level(0)),
])
def test_what_may_commit_is_marked(cnx, what, action):
    before = marks()
    action(cnx)
    assert marks() == before + 1, what


@pytest.mark.parametrize('what, action', [
    ('SELECT', statement('SELECT 1')),
    ('DML', statement('CREATE TEMP TABLE t (i int); INSERT INTO t VALUES (1)')),
    ('rollback()', lambda cnx: (statement('SELECT 1')(cnx), cnx.rollback())),
    ('autocommit = False', lambda cnx: setattr(cnx, 'autocommit', False)),
    ('savepoints', statement('SAVEPOINT a; RELEASE SAVEPOINT a')),
])
def test_what_cannot_commit_is_not_marked(cnx, what, action):
    before = marks()
    action(cnx)
    assert marks() == before, what


def test_commit_of_a_closed_connection_is_not_marked(cnx):
    cnx.close()
    before = marks()
    with pytest.raises(psycopg2.InterfaceError):
        cnx.commit()
    assert marks() == before


def test_marks_are_per_thread(cnx):
    before = marks()
    seen = []
    thread = threading.Thread(target=lambda: (cnx.commit(), seen.append(marks())))
    thread.start()
    thread.join()
    assert seen == [1] and marks() == before


@pytest.mark.parametrize('what, action', [
    ('a cursor of another class', lambda cnx: cnx.cursor(
        cursor_factory=psycopg2.extras.DictCursor).close()),
    ('COMMIT behind a Unicode name', statement(
        'SELECT 1 AS U&"\\0069d"; COMMIT')),
    ('DO block', statement('DO $$ BEGIN PERFORM 1; END $$')),
    ('DO block then END', statement('DO $$ BEGIN PERFORM 1; END $$; END')),
    ('dblink', statement("SELECT 'dblink_exec' WHERE false")),
    ('pg_background', statement("SELECT 'pg_background_launch' WHERE false")),
])
def test_what_we_cannot_see_into_is_marked(cnx, what, action):
    """What may commit out of our sight counts as a commit (names in strings too:
    erring on the side of no retry)."""
    before = marks()
    action(cnx)
    assert marks() > before, what
