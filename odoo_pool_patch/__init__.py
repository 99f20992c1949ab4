"""db_pooling engine: connection pooling for Odoo 16-19 (pure Python, psycopg2 only).

Map of the package (one job per module; docs/architecture.rst has the longer version):

- ``pool``          the per-process pool, drop-in for ``odoo.sql_db.ConnectionPool``
- ``maintenance``   the timer thread: idle eviction, lifetime, dead sockets, leaks, shedding
- ``after_fork``    a forked child's reset steps, in one stated order
- ``shared_state``  the shared-memory segment of an instance: layout, lock, crash reaping
- ``budget``        one connection budget for all processes: slots, priority queue, grants
- ``options``       odoo.conf options, defaults and validation
- ``tls``           TLS options for primary and replicas, start-up checks, failure messages
- ``dsn``           DSN keys and comparison (Odoo's ``_dsn_equals`` semantics)
- ``errors``        PoolTimeout (a psycopg2 PoolError) and ConfigError
- ``odoo_install``  swaps Odoo's pool in ``post_load`` (imports Odoo lazily)
- ``observability/`` one view of the instance read from the shared state (``instance_view``),
  as Prometheus text (``metrics``) and the dashboard's figures (``dashboard``)
- ``embedded_pg``   throw-away PostgreSQL clusters (and a test PKI) for demo, tests, benchmarks
- ``odoo_runner``   finds and runs real Odoo servers for the demo, tests, benchmarks
- ``demo``, ``top``, ``check``, ``cli``   the ``odoo-pool`` command
- ``pytest_plugin`` restores Odoo's server-wide load order under pytest-odoo
"""
# The one version of the distribution (pyproject.toml reads it) and of the addon (its
# manifest says the same x.y.z; Odoo shows <series>.x.y.z): docs/development.rst.
__version__ = '1.1.0'
