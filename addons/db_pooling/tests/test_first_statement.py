"""A connection that dies between the borrow and its first statement is replaced
transparently (odoo_pool_patch.odoo_glue.first_statement); one that dies later fails as in
stock Odoo. Real backends terminated with pg_terminate_backend."""
import contextlib
import threading
import time

import psycopg2

from odoo import sql_db
from odoo.modules.registry import Registry
from odoo.tests import common


def terminate_pid(pid):
    """Terminate backend ``pid`` from another session; wait until it is gone."""
    info = dict(sql_db.connection_info_for(common.get_db_name())[1])
    info.pop('application_name', None)
    killer = psycopg2.connect(**info)
    killer.autocommit = True
    try:
        with killer.cursor() as cur:
            cur.execute('SELECT pg_terminate_backend(%s)', (pid,))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cur.execute('SELECT count(*) FROM pg_stat_activity WHERE pid = %s', (pid,))
                if not cur.fetchone()[0]:
                    break
                time.sleep(0.02)
    finally:
        killer.close()


def terminate(cr):
    """Terminate the backend behind Odoo cursor ``cr``; its pid."""
    pid = cr._cnx.get_backend_pid()
    terminate_pid(pid)
    return pid


@contextlib.contextmanager
def doomed_cursor():
    """A cursor whose connection the test kills: closing it fails as in stock Odoo."""
    cr = Registry(common.get_db_name()).cursor()
    try:
        yield cr
    finally:
        try:
            cr.close()
        except psycopg2.Error:
            pass


class TestFirstStatement(common.BaseCase):

    def test_dead_before_first_statement_is_replaced(self):
        registry = Registry(common.get_db_name())
        with registry.cursor() as cr:
            dead = terminate(cr)
            cr.execute('SELECT pg_backend_pid()')
            self.assertNotEqual(cr.fetchone()[0], dead)
            cr.execute('SELECT 1')                  # the cursor goes on normally
            self.assertEqual(cr.fetchone(), (1,))

    def test_dead_after_first_statement_fails_as_in_stock_odoo(self):
        with doomed_cursor() as cr:
            cr.execute('SELECT 1')
            terminate(cr)
            with self.assertRaises(psycopg2.OperationalError):
                cr.execute('SELECT 1')

    def test_dead_in_autocommit_is_not_sent_again(self):
        with doomed_cursor() as cr:
            cr._cnx.autocommit = True
            terminate(cr)
            with self.assertRaises(psycopg2.OperationalError):
                cr.execute('SELECT 1')

    def test_first_statement_killed_while_running_is_not_sent_again(self):
        """Killed during the statement (not before it): it may have written, even
        committed, so it fails as in stock Odoo instead of running twice."""
        with doomed_cursor() as cr:
            pid = cr._cnx.get_backend_pid()
            killer = threading.Timer(0.5, terminate_pid, (pid,))
            killer.start()
            started = time.monotonic()
            try:
                with self.assertRaises(psycopg2.OperationalError):
                    cr.execute('SELECT pg_sleep(3)')
            finally:
                killer.join()
            self.assertLess(time.monotonic() - started, 2.5)   # not re-run for 3 s more

    def test_connection_closed_by_close_db_is_not_replaced(self):
        with doomed_cursor() as cr:
            sql_db.close_db(common.get_db_name())
            with self.assertRaises(psycopg2.InterfaceError):
                cr.execute('SELECT 1')


class TestDeadRollback(common.BaseCase):
    """Closing a cursor whose session the server ended inside a transaction succeeds
    (stock Odoo raises from its rollback, the connection is not given back to the pool,
    and a request that had committed answers 500)."""

    def doomed_after_commit(self):
        cr = Registry(common.get_db_name()).cursor()
        cr.execute('SELECT 1')
        cr.commit()
        cr.execute('SELECT 1')          # a transaction open at close
        terminate(cr)
        return cr

    def test_closing_a_cursor_whose_backend_died_in_a_transaction(self):
        cr = self.doomed_after_commit()
        hooks = []
        cr.postrollback.add(lambda: hooks.append('postrollback'))
        cnx = cr._cnx
        cr.close()
        self.assertTrue(cr._closed)
        self.assertEqual(hooks, ['postrollback'])
        self.assertNotIn(cnx, sql_db._Pool.books.used)      # given back (closed)

    def test_control_stock_close_raises(self):
        cr = self.doomed_after_commit()
        try:
            with self.assertRaises(psycopg2.Error):
                sql_db.Cursor._close.db_pooling_stock(cr)
        finally:
            sql_db._Pool.give_back(cr._cnx, keep_in_pool=False)

    def test_rollback_outside_close_still_raises(self):
        cr = self.doomed_after_commit()
        try:
            with self.assertRaises(psycopg2.Error):
                cr.rollback()
        finally:
            cr.close()

    def test_rollback_after_a_failed_commit_still_raises(self):
        """A COMMIT whose answer was lost may have committed: never 'rolled back'."""
        cr = Registry(common.get_db_name()).cursor()
        cr.execute('SELECT 1')
        terminate(cr)
        with self.assertRaises(psycopg2.Error):
            cr.commit()
        try:
            with self.assertRaises(psycopg2.Error):
                cr._close(False)        # (close() itself skips a closed connection)
        finally:
            sql_db._Pool.give_back(cr._cnx, keep_in_pool=False)
