"""Test-only routes (loaded server-wide by tests/odoo/test_odoo_replicas.py, never shipped)."""
from odoo import http
from odoo.http import request


def _server():
    request.env.cr.execute('SELECT inet_server_port(), pg_is_in_recovery()')
    return request.env.cr.fetchone()


class ReplicaTest(http.Controller):
    @http.route('/dbp_test/server', type='json', auth='user', readonly=True)
    def server(self):
        """A read-only route (18+): which server served it."""
        return _server()

    @http.route('/dbp_test/write', type='json', auth='user', readonly=True)
    def write(self, value):
        """A read-only route that writes: 18+ retries it on the primary."""
        request.env['ir.config_parameter'].sudo().set_param('dbp_test.value', value)
        return _server()

    @http.route('/dbp_test/slow_server', type='json', auth='user', readonly=True)
    def slow_server(self, seconds):
        """A read-only route (18+) that takes ``seconds``: which server finished it."""
        request.env.cr.execute('SELECT pg_sleep(%s)', [seconds])
        return _server()

    @http.route('/dbp_test/slow_write', type='json', auth='user')
    def slow_write(self, value, seconds):
        """A route that writes, then takes ``seconds`` before its commit."""
        request.env['ir.config_parameter'].sudo().set_param('dbp_test.slow', value)
        request.env.flush_all()
        request.env.cr.execute('SELECT pg_sleep(%s)', [seconds])
        return _server()

    @http.route('/dbp_test/replica_cursor', type='json', auth='user')
    def replica_cursor(self):
        """The replica_cursor() API (every series)."""
        from odoo_pool_patch.odoo_glue.replica_routes import replica_cursor
        with replica_cursor(request.env.cr.dbname) as cr:
            cr.execute('SELECT inet_server_port(), pg_is_in_recovery()')
            return cr.fetchone()

    @http.route('/dbp_test/status', type='json', auth='user')
    def status(self):
        """servers_status() and this session's read-your-writes position."""
        from odoo_pool_patch.replicas.replica_health import servers_status
        from odoo_pool_patch.odoo_glue.replica_routes import SESSION_KEY
        return {'servers': servers_status(), 'lsn': request.session.get(SESSION_KEY)}

    @http.route('/dbp_test/parking_deferred', type='json', auth='user')
    def parking_deferred(self):
        """Whether the request runs under db_pooling's deferred parking (every series)."""
        from odoo_pool_patch.pool.sharing import parking_deferred
        return parking_deferred()
