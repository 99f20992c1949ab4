{
    'name': 'Database Connection Pooling',
    'summary': 'One connection budget for all Odoo workers, fair waiting, idle eviction, '
               'replica routing and TLS: in-process, no PgBouncer needed',
    # odoo_pool_patch.__version__ (x.y.z; Odoo shows <series>.x.y.z), one manifest for 16-19
    'version': '1.1.0',
    'category': 'Hidden/Tools',
    'author': 'db_pooling developers',
    'license': 'LGPL-3',
    'depends': ['base', 'web'],
    'data': ['views/dashboard_views.xml'],
    'assets': {
        'web.assets_backend': ['db_pooling/static/src/dashboard/*'],
    },
    # The distribution (pyproject.toml: odoo-pool-patch) and the package Odoo imports: found
    # after pip install, and imported from a source checkout on PYTHONPATH.
    'external_dependencies': {'python': ['odoo_pool_patch']},
    # Must be loaded server-wide: --load=base,web,db_pooling
    'post_load': 'post_load',
    'installable': True,
    'application': False,
}
