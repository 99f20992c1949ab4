"""Tools for the demo, the tests and the benchmarks, not for Odoo at run time: throw-away
PostgreSQL clusters and PgBouncers (``embedded_pg``, ``embedded_pgbouncer``), real Odoo
servers (``odoo_runner``), the demo (``demo``, ``odoo-pool demo``) and the pytest plugin
for pytest-odoo (``pytest_plugin``). Nothing of the engine or the addon imports them."""
