from odoo import http, release
from odoo.exceptions import AccessError
from odoo.http import request

from .status import JSON, pool_status

# Odoo options shown next to ours on the dashboard (passwords masked).
ODOO_OPTIONS = ('workers', 'max_cron_threads', 'db_maxconn', 'db_maxconn_gevent', 'db_host',
                'db_port', 'db_user', 'db_password', 'db_sslmode', 'db_replica_host',
                'db_replica_port', 'db_app_name', 'server_wide_modules')


def effective_settings():
    from odoo.tools import config
    from odoo_pool_patch.odoo_glue.odoo_install import budget_settings
    from odoo_pool_patch.odoo_glue.runtime import RUNTIME
    settings = RUNTIME.settings
    shown = {}
    for name in ODOO_OPTIONS:
        value = config.get(name)
        if value not in (None, False, ''):
            shown[name] = '(set)' if 'password' in name else value
    if settings is not None:
        shown.update(settings.as_options())
        budget, reserve, path = budget_settings(settings)
        shown.update({'db_pool_max_connections (effective)': budget if settings.shared else None,
                      'db_pool_cron_reserve (effective)': reserve if settings.shared else None,
                      'db_pool_shared_path (effective)': path if settings.shared else None})
    return shown


def dashboard_payload(cr):
    """Everything the dashboard shows; each failing source is reported, not fatal."""
    from odoo import sql_db
    from odoo_pool_patch.observability import dashboard
    from odoo_pool_patch.odoo_glue.odoo_install import current_role, is_active, server_wide_modules
    from odoo_pool_patch.odoo_glue.runtime import RUNTIME
    budget = RUNTIME.budget
    if budget is not None:
        figures = dashboard.shared_figures(budget.state)
    else:
        status = pool_status()
        snapshots = [pool for pool in status['pools'].values() if 'stats' in pool]
        figures = dashboard.local_figures(snapshots, current_role())

    def activity(our_pids):
        # A savepoint: a failing query must not break the request's transaction.
        with cr.savepoint():
            return dashboard.server_activity(cr, our_pids)

    primary = sql_db.connection_info_for('postgres')[1]
    return dashboard.collect(figures, primary, activity, effective_settings(), is_active(),
                             extra={'server_wide': 'db_pooling' in server_wide_modules(),
                                    'series': release.serie})


class DbPoolingDashboard(http.Controller):

    @http.route('/db_pooling/dashboard_data', type=JSON, auth='user')
    def dashboard_data(self):
        """The live dashboard's data, instance-wide; Settings administrators only."""
        if not request.env.user.has_group('base.group_system'):
            raise AccessError('Only Settings administrators can see the database connections.')
        return dashboard_payload(request.env.cr)
