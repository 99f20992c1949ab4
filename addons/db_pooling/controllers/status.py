import os

from odoo import http, release
from odoo.exceptions import AccessError
from odoo.http import request

# Odoo 19 renamed the JSON-RPC route type.
JSON = 'jsonrpc' if release.version_info[0] >= 19 else 'json'


def pool_status():
    """Pools of the worker process serving this request, as plain data."""
    from odoo import sql_db
    from odoo_pool_patch.odoo_glue.odoo_install import is_active
    from odoo_pool_patch.odoo_glue.runtime import RUNTIME
    pools = {}
    for name in ('_Pool', '_Pool_readonly'):
        pool = getattr(sql_db, name, None)
        if pool is not None:
            pools[name] = {
                'class': f'{type(pool).__module__}.{type(pool).__qualname__}',
                'repr': repr(pool),
                **(pool.snapshot() if hasattr(pool, 'snapshot') else {}),
            }
    return {
        'pid': os.getpid(),
        'active': is_active(),
        'series': release.serie,
        'settings': RUNTIME.settings.as_options() if RUNTIME.settings else {},
        'pool_class': f'{sql_db.ConnectionPool.__module__}.{sql_db.ConnectionPool.__qualname__}',
        'pools': pools,
    }


class DbPoolingStatus(http.Controller):

    @http.route('/db_pooling/pool_info', type=JSON, auth='user')
    def pool_info(self):
        """This worker's pools; Settings administrators only."""
        if not request.env.user.has_group('base.group_system'):
            raise AccessError('Only Settings administrators can see the connection pools.')
        return pool_status()
