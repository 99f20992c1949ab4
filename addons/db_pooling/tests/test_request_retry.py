"""A transaction whose connection the server closed while it ran is run again on a
new connection when nothing of it can have been committed (odoo_pool_patch.
request_retry, through Odoo's own ``odoo.service.model.retrying``); never after a
commit, whatever its form. Real backends terminated with pg_terminate_backend."""
import contextlib
import threading
import time
import uuid

import psycopg2

from odoo import SUPERUSER_ID, api, sql_db
from odoo.modules.registry import Registry
from odoo.service import model as service_model
from odoo.tests import common

from odoo_pool_patch.odoo_glue import request_retry

from .test_first_statement import terminate_pid

TABLE = 'dbp_retry_probe'
SLOW = 'dbp_retry_slow_commit'


def count(tag):
    with Registry(common.get_db_name()).cursor() as cr:
        cr.execute(f'SELECT count(*) FROM {TABLE} WHERE tag = %s', (tag,))
        return cr.fetchone()[0]


def insert(cr, tag):
    cr.execute(f'INSERT INTO {TABLE} (tag) VALUES (%s)', (tag,))


@contextlib.contextmanager
def database_timeout(value):
    """idle_in_transaction_session_timeout = value for the sessions opened meanwhile."""
    dbname = common.get_db_name()
    with Registry(dbname).cursor() as cr:
        cr.execute(f"ALTER DATABASE {dbname} SET idle_in_transaction_session_timeout = "
                   f"'{value}'")
    sql_db.close_db(dbname)         # new sessions from here on have it
    try:
        yield
    finally:
        with Registry(dbname).cursor() as cr:
            cr.execute(f'ALTER DATABASE {dbname} RESET idle_in_transaction_session_timeout')
        sql_db.close_db(dbname)


class TestRequestRetry(common.BaseCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with Registry(common.get_db_name()).cursor() as cr:
            cr.execute(f'CREATE TABLE IF NOT EXISTS {TABLE} (id serial, tag text)')
            # A COMMIT that takes 2 s: a deferred constraint trigger sleeps in it.
            cr.execute(f'CREATE TABLE IF NOT EXISTS {SLOW} (id serial)')
            cr.execute(f"""
                CREATE OR REPLACE FUNCTION {SLOW}_fn() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
                DROP TRIGGER IF EXISTS {SLOW}_tr ON {SLOW};
                CREATE CONSTRAINT TRIGGER {SLOW}_tr AFTER INSERT ON {SLOW}
                    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {SLOW}_fn();
            """)

    def setUp(self):
        super().setUp()
        self.tag = uuid.uuid4().hex
        self.attempts = []          # backend pid of each attempt

    def run_request(self, body, retrying=None):
        """Run ``body(env, attempt)`` as Odoo runs a request: through ``retrying``
        (ours unless given), on a cursor closed without commit afterwards."""
        cr = Registry(common.get_db_name()).cursor()
        env = api.Environment(cr, SUPERUSER_ID, {})

        def attempt():
            self.attempts.append(env.cr._cnx.get_backend_pid())
            return body(env, len(self.attempts))
        try:
            return (retrying or service_model.retrying)(attempt, env)
        finally:
            with contextlib.suppress(psycopg2.Error):
                cr.close()

    def kill_later(self, env, delay):
        timer = threading.Timer(delay, terminate_pid, (env.cr._cnx.get_backend_pid(),))
        timer.start()
        self.addCleanup(timer.join)

    def kill_now(self, env):
        terminate_pid(env.cr._cnx.get_backend_pid())

    def retries(self):
        return sql_db._Pool.stats.request_retries

    # ------------------------------------------------------------ run again
    def test_killed_while_running_runs_again_on_a_new_connection(self):
        retries = self.retries()

        def body(env, attempt):
            insert(env.cr, self.tag)
            if attempt == 1:
                self.kill_later(env, 0.3)
                env.cr.execute('SELECT pg_sleep(3)')
            return attempt
        self.assertEqual(self.run_request(body), 2)
        self.assertEqual(len(set(self.attempts)), 2)
        self.assertEqual(count(self.tag), 1)
        self.assertEqual(self.retries(), retries + 1)

    def test_control_stock_retrying_fails_the_request(self):
        """Without the wrapper (Odoo's own retrying) the same request fails."""
        def body(env, attempt):
            insert(env.cr, self.tag)
            self.kill_later(env, 0.3)
            env.cr.execute('SELECT pg_sleep(3)')
        with self.assertRaises(psycopg2.Error):
            self.run_request(body, retrying=service_model.retrying.db_pooling_stock)
        self.assertEqual(len(self.attempts), 1)
        self.assertEqual(count(self.tag), 0)

    def test_killed_idle_in_transaction_runs_again(self):
        self.assert_killed_idle_runs_again()

    def assert_killed_idle_runs_again(self):
        def body(env, attempt):
            insert(env.cr, self.tag)
            if attempt == 1:
                self.kill_now(env)
            env.cr.execute('SELECT 1')
        self.run_request(body)
        self.assertEqual(len(self.attempts), 2)
        self.assertEqual(count(self.tag), 1)

    def test_killed_inside_a_savepoint_runs_again(self):
        def body(env, attempt):
            insert(env.cr, self.tag)
            with env.cr.savepoint():
                insert(env.cr, self.tag)
                if attempt == 1:
                    self.kill_now(env)
                env.cr.execute('SELECT 1')
        self.run_request(body)
        self.assertEqual(len(self.attempts), 2)
        self.assertEqual(count(self.tag), 2)

    def test_session_characteristics_are_kept(self):
        """Repeatable read (Odoo's isolation level) and read-only (Odoo 18+'s read-only
        cursors on a replica) carry over to the new connection."""
        seen = []

        def body(env, attempt):
            if attempt == 1:
                env.cr._cnx.set_session(readonly=True)
            env.cr.execute('SELECT current_setting(%s), current_setting(%s)',
                           ('transaction_isolation', 'transaction_read_only'))
            seen.append(env.cr.fetchone())
            if attempt == 1:
                self.kill_now(env)
                env.cr.execute('SELECT 1')
        self.run_request(body)
        self.assertEqual(len(self.attempts), 2)
        self.assertEqual(seen, [('repeatable read', 'on')] * 2)

    def test_gives_up_after_two_retries(self):
        def body(env, attempt):
            env.cr.execute('SELECT 1')
            self.kill_now(env)
            env.cr.execute('SELECT 1')
        with self.assertRaises(psycopg2.Error):
            self.run_request(body)
        self.assertEqual(len(self.attempts), 3)

    # ------------------------------------------------------------ never after a commit
    def assert_fails_once_after(self, commit):
        """``commit(env)`` commits a row, then the request's backend is terminated: the
        request fails after one attempt and the row is there once."""
        def body(env, attempt):
            commit(env)
            env.cr.execute('SELECT 1')
            self.kill_now(env)
            env.cr.execute('SELECT 1')
        with self.assertRaises(psycopg2.Error):
            self.run_request(body)
        self.assertEqual(len(self.attempts), 1)
        self.assertEqual(count(self.tag), 1)

    def test_not_run_again_after_a_commit(self):
        def commit(env):
            insert(env.cr, self.tag)
            env.cr.commit()
            insert(env.cr, 'rolled back: ' + self.tag)
        self.assert_fails_once_after(commit)

    def test_not_run_again_after_another_cursor_committed(self):
        def commit(env):
            with Registry(common.get_db_name()).cursor() as other:
                insert(other, self.tag)
        self.assert_fails_once_after(commit)

    def test_not_run_again_after_autocommit(self):
        def commit(env):
            other = Registry(common.get_db_name()).cursor()
            try:
                other._cnx.autocommit = True
                insert(other, self.tag)
            finally:
                other.close()
        self.assert_fails_once_after(commit)

    def test_commit_sent_as_sql_is_not_run_again(self):
        """Run again, it would write the committed row twice."""
        self.assert_fails_once_after(lambda env: env.cr.execute(
            f'INSERT INTO {TABLE} (tag) VALUES (%s); COMMIT', (self.tag,)))

    def test_commit_killed_on_its_way_is_never_sent_again(self):
        """The request's final COMMIT (2 s, a deferred trigger) is killed after 0.5 s:
        the server may have applied a COMMIT whose answer was lost, so it fails."""
        def body(env, attempt):
            env.cr.execute(f'INSERT INTO {SLOW} DEFAULT VALUES')
            self.kill_later(env, 0.5)
        started = time.monotonic()
        with self.assertRaises(psycopg2.Error):
            self.run_request(body)
        self.assertEqual(len(self.attempts), 1)
        self.assertLess(time.monotonic() - started, 10)

    def test_connection_closed_by_the_pool_is_not_run_again(self):
        def body(env, attempt):
            env.cr.execute('SELECT 1')
            sql_db.close_db(common.get_db_name())
            env.cr.execute('SELECT 1')
        with self.assertRaises(psycopg2.Error):
            self.run_request(body)
        self.assertEqual(len(self.attempts), 1)


    def test_idle_in_transaction_timeout_is_not_run_again(self):
        """A session ended by idle_in_transaction_session_timeout looks like a terminated
        one to the client; a request that lasted longer than that timeout would only meet
        it again, so it fails (at once, after one attempt)."""
        def body(env, attempt):
            env.cr.execute('SELECT 1')
            time.sleep(0.8)
            env.cr.execute('SELECT 1')
        with database_timeout('300ms'), self.assertRaises(psycopg2.Error) as caught:
            self.run_request(body)
        self.assertEqual(len(self.attempts), 1)
        self.assertTrue(request_retry.ended_by_server(caught.exception))

    def test_killed_under_a_timeout_it_did_not_reach_runs_again(self):
        with database_timeout('1min'):
            self.assert_killed_idle_runs_again()


class TestRerun(common.BaseCase):
    """What Odoo runs outside ``retrying`` with cursors of its own (registry loading and
    signaling, the login of 16-18) runs again by the same rules."""

    def setUp(self):
        super().setUp()
        self.tag = uuid.uuid4().hex
        self.attempts = 0

    def own_cursor_work(self, commit_first=False, idle=0, commits_matter=None):
        def work(dbname):
            self.attempts += 1
            registry = Registry(dbname)
            if commit_first:
                with registry.cursor() as cr:
                    insert(cr, self.tag)
            with registry.cursor() as cr:
                insert(cr, self.tag)
                if self.attempts == 1 and not idle:
                    terminate_pid(cr._cnx.get_backend_pid())
                time.sleep(idle)
                cr.execute('SELECT 1')
            return self.attempts
        return request_retry.rerun(work, 'testing', commits_matter=commits_matter)

    def test_runs_again_when_the_server_ended_its_session(self):
        self.assertEqual(self.own_cursor_work()(common.get_db_name()), 2)
        self.assertEqual(count(self.tag), 1)

    def test_not_run_again_after_a_commit(self):
        with self.assertRaises(psycopg2.Error):
            self.own_cursor_work(commit_first=True)(common.get_db_name())
        self.assertEqual(self.attempts, 1)
        self.assertEqual(count(self.tag), 1)

    def test_commits_that_do_not_matter_do_not_stop_it(self):
        """Registry loading: what it commits, it commits again anyway."""
        work = self.own_cursor_work(commit_first=True, commits_matter=lambda a, k: False)
        self.assertEqual(work(common.get_db_name()), 2)
        self.assertEqual(count(self.tag), 3)

    def test_not_run_again_after_a_timeout_it_may_have_met(self):
        with database_timeout('300ms'), self.assertRaises(psycopg2.Error):
            self.own_cursor_work(idle=0.8)(common.get_db_name())
        self.assertEqual(self.attempts, 1)

    def test_registry_loading_updates_modules(self):
        updates = request_retry._updates_modules
        self.assertFalse(updates((Registry, 'db'), {}))
        self.assertFalse(updates((Registry, 'db', False, None, False), {}))
        self.assertTrue(updates((Registry, 'db', False, None, True), {}))
        self.assertTrue(updates((Registry, 'db'), {'update_module': True}))
        self.assertTrue(updates((Registry, 'db'), {'install_modules': ('sale',)}))

    def test_registry_signaling_and_login_are_run_again(self):
        from odoo import http
        self.assertTrue(Registry.new.db_pooling_stock)
        self.assertTrue(Registry.check_signaling.db_pooling_stock)
        self.assertTrue(http.Session.authenticate.db_pooling_stock)
