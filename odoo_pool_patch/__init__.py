"""db_pooling engine: connection pooling for Odoo 16-19 (pure Python, psycopg2 only).

Map of the package (one job per module):

- ``pool``          the per-process pool, drop-in for ``odoo.sql_db.ConnectionPool``
- ``maintenance``   the timer thread: idle eviction, max lifetime, dead sockets, leaks
- ``options``       odoo.conf options, defaults and validation
- ``dsn``           DSN keys and comparison (Odoo's ``_dsn_equals`` semantics)
- ``errors``        PoolTimeout (a psycopg2 PoolError) and ConfigError
- ``odoo_install``  swaps Odoo's pool in ``post_load`` (imports Odoo lazily)
- ``embedded_pg``   throw-away PostgreSQL clusters for the demo, tests, benchmarks
- ``odoo_runner``   finds and runs real Odoo servers for the demo, tests, benchmarks
- ``demo``, ``cli`` the ``odoo-pool`` command
"""
__version__ = '0.1.0'
