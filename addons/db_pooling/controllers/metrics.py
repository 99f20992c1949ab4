import hmac

from odoo import http
from odoo.http import request


class DbPoolingMetrics(http.Controller):

    @http.route('/db_pooling/metrics', type='http', auth='none', methods=['GET'],
                csrf=False, save_session=False)
    def metrics(self):
        """Prometheus metrics of the whole instance (Authorization: Bearer <token>)."""
        from odoo_pool_patch.observability import metrics
        from odoo_pool_patch.odoo_glue.runtime import RUNTIME
        settings, budget = RUNTIME.settings, RUNTIME.budget
        token = settings.metrics_token if settings else None
        if not token:
            return request.make_response(
                'db_pooling metrics are off: set db_pool_metrics_token in odoo.conf\n',
                [('Content-Type', 'text/plain')], status=404)
        header = request.httprequest.headers.get('Authorization', '')
        if not header.startswith('Bearer '):
            return request.make_response(
                'Bearer token required\n', [('Content-Type', 'text/plain'),
                                            ('WWW-Authenticate', 'Bearer realm="db_pooling"')],
                status=401)
        if not hmac.compare_digest(header[len('Bearer '):].strip().encode(), token.encode()):
            return request.make_response('Wrong token\n', [('Content-Type', 'text/plain')],
                                         status=403)
        if budget is None:
            return request.make_response(
                'db_pooling metrics need the shared budget (db_pool_shared = on)\n',
                [('Content-Type', 'text/plain')], status=503)
        return request.make_response(
            metrics.render(budget.state),
            [('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')])
