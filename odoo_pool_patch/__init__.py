"""db_pooling engine: connection pooling for Odoo 16-19 (pure Python, psycopg2 only).

Map of the package, one job per module (docs/architecture.rst has the longer version).
The subpackages are layers, lowest first; a module imports only from its own layer or
one below (tests/engine/test_import_graph.py checks it). Odoo imports what is below
``cli/`` through the addon.

At the top: ``errors`` (PoolTimeout, a psycopg2 PoolError, and ConfigError), ``dsn`` (DSN
  keys and comparison, Odoo's ``_dsn_equals`` semantics), ``faults`` (named fault points of
  the hand-over protocols, tests only), ``after_fork`` (a forked child's reset steps, in
  one stated order)
``config/``         ``options`` (db_pooling's options, defaults, validation: ``Settings``),
                    ``conf_file`` (the ``[db_pooling]`` section of odoo.conf), ``tls`` (TLS
                    options, start-up checks, messages), ``stock_options`` (Odoo's options
                    that interact with ours), ``conf_example`` (generates odoo.conf.example
                    and the reference from all of them)
``sessions/``       ``conn_record`` (``ConnRecord``: what the pool knows about one
                    connection, ``cnx.pooled``), ``session_state`` (which statements leave
                    session state, and what clears it), ``session_tracking`` (the cursor
                    that notes it, privileges, the session's name), ``commit_marks``
                    (whether this thread may have committed)
``shared/``         ``shared_state`` (an instance's shared-memory segment: layout, lock,
                    crash reaping), ``doorbell`` (a futex word waiting processes sleep on),
                    ``backend_exit`` (when a closed connection's backend has exited;
                    closing with a watch on it; an idle one's server gone), ``budget`` (one
                    connection budget for all processes), ``parking`` (idle connections
                    parked for any worker), ``exchange`` (idle connections handed from one
                    process to another), ``outage`` (waiting through a server outage)
``pool/``           ``connection_pool`` (the per-process pool, drop-in for
                    ``odoo.sql_db.ConnectionPool``) and its parts, one object each:
                    ``slots`` (books, grants, waiters), ``sessions`` (open, prepare, reset),
                    ``sharing`` (parking, taking, lending, budget waits), ``upkeep``
                    (maintenance pass, figures); ``borrowers`` (who holds a connection and
                    where it was borrowed), ``maintenance`` (the timer thread: idle
                    eviction, lifetime, dead sockets, leaks, shedding)
``replicas/``       ``router`` (the replica list and the choice per borrow),
                    ``replica_health`` (probes, bans, lag)
``odoo_glue/``      ``odoo_install`` (swaps Odoo's pool in ``post_load``), ``list_dbs_cache``
                    (Odoo's database list kept a moment), ``first_statement`` (a cursor
                    whose connection died before its first statement moves),
                    ``request_retry`` (a request whose connection the server closed runs
                    again), ``replica_routes`` (which Odoo requests read from replicas),
                    ``runtime`` (``RUNTIME``: what was installed in this process)
``observability/``  one view of the instance (``instance_view``) as Prometheus text
                    (``metrics``) and the dashboard's figures (``dashboard``)
``cli/``            the ``odoo-pool`` command (``main``): ``top``, ``check``
``devtools/``       demo, tests and benchmarks only: ``embedded_pg``,
                    ``embedded_pgbouncer``, ``odoo_runner``, ``demo``, ``pytest_plugin``
"""
# The one version of the distribution (pyproject.toml reads it) and of the addon (its
# manifest says the same x.y.z; Odoo shows <series>.x.y.z): docs/development.rst.
__version__ = '1.1.0'
