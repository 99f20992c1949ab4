"""Run inside Odoo (pytest-odoo, or Odoo's --test-enable) with db_pooling loaded server-wide."""
import json

from odoo import sql_db
from odoo.modules.registry import Registry
from odoo.tests import common

from odoo_pool_patch.odoo_glue.odoo_install import is_active
from odoo_pool_patch.pool.connection_pool import ConnectionPool as PoolEngine


class TestPoolActive(common.BaseCase):

    def test_odoo_uses_our_pool(self):
        with Registry(common.get_db_name()).cursor() as cr:
            cr.execute('SELECT 1')
            self.assertIsInstance(sql_db._Pool, PoolEngine)
            self.assertIn(cr._cnx, sql_db._Pool.books.used)
        self.assertTrue(is_active())
        self.assertTrue(issubclass(sql_db.ConnectionPool, PoolEngine))

    def test_connection_is_odoo_psycoconnection(self):
        with Registry(common.get_db_name()).cursor() as cr:
            self.assertIsInstance(cr._cnx, sql_db.PsycoConnection)

    def test_freed_connection_is_reused(self):
        registry = Registry(common.get_db_name())
        with registry.cursor() as cr:
            first = cr._cnx
        with registry.cursor() as cr:
            self.assertIs(cr._cnx, first)


class TestPoolInfoAccess(common.HttpCase):

    def _call(self, route='/db_pooling/pool_info'):
        response = self.url_open(route, data=json.dumps(
            {'jsonrpc': '2.0', 'method': 'call', 'id': 1, 'params': {}}),
            headers={'Content-Type': 'application/json'})
        return response.json()

    def test_admin_sees_pools(self):
        self.authenticate('admin', 'admin')
        result = self._call()['result']
        self.assertTrue(result['active'])
        self.assertIn('_Pool', result['pools'])

    def test_non_admin_gets_no_data(self):
        self.env['res.users'].create({
            'name': 'Pool Watcher', 'login': 'pool_watcher', 'password': 'pool_watcher_pw1'})
        self.authenticate('pool_watcher', 'pool_watcher_pw1')
        body = self._call()
        self.assertNotIn('result', body)
        self.assertIn('AccessError', body['error']['data']['name'])


class TestDashboardAccess(common.HttpCase):
    """The dashboard: its data route and its menu are for Settings administrators only."""
    _call = TestPoolInfoAccess._call

    def _non_admin(self):
        return self.env['res.users'].create({
            'name': 'Dashboard Watcher', 'login': 'dash_watcher', 'password': 'dash_watcher_pw1'})

    def test_admin_gets_dashboard_data(self):
        self.authenticate('admin', 'admin')
        result = self._call('/db_pooling/dashboard_data')['result']
        self.assertTrue(result['active'] and result['server_wide'])
        self.assertIn('held', result['totals'])
        self.assertIn(result['pid'], [worker['pid'] for worker in result['workers']])
        self.assertEqual(result['servers'][0]['kind'], 'primary')

    def test_non_admin_gets_no_dashboard_data(self):
        self._non_admin()
        self.authenticate('dash_watcher', 'dash_watcher_pw1')
        body = self._call('/db_pooling/dashboard_data')
        self.assertNotIn('result', body)
        self.assertIn('AccessError', body['error']['data']['name'])
        self.assertNotIn('workers', json.dumps(body))

    def test_menu_only_for_settings_administrators(self):
        menu = self.env.ref('db_pooling.menu_dashboard')
        self.assertEqual(menu.action, self.env.ref('db_pooling.action_dashboard'))
        menus = self.env['ir.ui.menu']
        user = self._non_admin()
        self.assertNotIn(menu.id, menus.with_user(user)._visible_menu_ids(debug=True))
        admin = self.env.ref('base.user_admin')
        self.assertIn(menu.id, menus.with_user(admin)._visible_menu_ids(debug=True))
