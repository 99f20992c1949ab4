from . import controllers


def post_load():
    """Replace Odoo's connection pool (server-wide loading only, see odoo_install)."""
    from odoo_pool_patch.odoo_glue.odoo_install import post_load_hook
    post_load_hook()
