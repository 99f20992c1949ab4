"""pytest plugin for running tests inside Odoo (pytest-odoo) with db_pooling server-wide.

Odoo calls ``post_load`` of server-wide modules when it imports them at
start-up. Under pytest-odoo, collecting ``addons/db_pooling/tests`` imports
``odoo.addons.db_pooling`` first, and Odoo then skips the module as already
loaded, so the pool would never be swapped. Loading the server-wide modules
at session start, before collection, restores Odoo's order.
Use: ``pytest -p odoo_pool_patch.devtools.pytest_plugin --odoo-config=... ``.
"""


def pytest_sessionstart(session):
    try:
        import odoo.modules.module
    except ImportError:
        return
    from ..odoo_glue.odoo_install import server_wide_modules
    for name in server_wide_modules():
        odoo.modules.module.load_openerp_module(name)
