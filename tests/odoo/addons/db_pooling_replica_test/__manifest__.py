{
    'name': 'db_pooling replica routing test routes',
    'version': '1.0',
    'depends': ['web'],
    'license': 'LGPL-3',
    'installable': True,
}
