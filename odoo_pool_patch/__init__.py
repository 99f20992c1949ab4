"""db_pooling engine: connection pooling for Odoo 16-19 (pure Python, psycopg2 only).

Map of the package, one job per module (docs/architecture.rst has the longer version).
Odoo loads the top level through the addon; the subpackages import it, never the reverse.

The pool and what moves connections between processes:
  ``pool``             the per-process pool, drop-in for ``odoo.sql_db.ConnectionPool``;
                       one concern per module mixed into it: ``pool_slots`` (books, grants,
                       waiters), ``pool_sessions`` (open, prepare, reset), ``pool_sharing``
                       (parking, taking, lending, budget waits), ``pool_upkeep``
                       (maintenance pass, figures)
  ``borrowers``        who holds a borrowed connection and where it was borrowed
  ``conn_record``      ``ConnRecord``: what the pool knows about one connection (``cnx.pooled``)
  ``maintenance``      the timer thread: idle eviction, lifetime, dead sockets, leaks, shedding
  ``after_fork``       a forked child's reset steps, in one stated order
  ``shared_state``     the shared-memory segment of an instance: layout, lock, crash reaping
  ``budget``           one connection budget for all processes: slots, priority queue, grants
  ``exchange``         idle connections handed from one process to another (donor round trip)
  ``parking``          idle connections parked in the master's socket pairs for any worker
  ``doorbell``         a futex word the waiting processes sleep on
  ``backend_exit``     when a closed connection's backend has exited (its slot reusable);
                       closing with a watch on that exit; an idle one's server gone
  ``outage``           waiting through a server outage, one prober per server
  ``faults``           named fault points of the hand-over protocols (tests only)
Sessions:
  ``session_state``    which statements leave session state, and what clears it
  ``session_tracking`` the cursor that notes it, privileges, the session's name
  ``first_statement``  a cursor whose connection died before its first statement moves
  ``request_retry``    a request whose connection the server closed runs again
  ``commit_marks``     whether this thread may have committed (what forbids that retry)
Replicas:
  ``replicas``         the replica list and the router; ``replica_health`` probes and
                       bans; ``replica_routes`` which Odoo requests read from replicas
Configuration:
  ``options``          db_pooling's options, defaults and validation (``Settings``)
  ``conf_file``        the ``[db_pooling]`` section of odoo.conf
  ``tls``              TLS options for primary and replicas, start-up checks, messages
  ``stock_options``    Odoo's options that interact with ours; ``conf_example`` generates
                       odoo.conf.example and the reference from all of them
  ``dsn``              DSN keys and comparison (Odoo's ``_dsn_equals`` semantics)
  ``errors``           PoolTimeout (a psycopg2 PoolError) and ConfigError
Odoo:
  ``odoo_install``     swaps Odoo's pool in ``post_load`` (imports Odoo lazily)
  ``list_dbs_cache``   Odoo's database list kept a moment in each process
  ``runtime``          what was installed in this process (``RUNTIME``: settings, budget,
                       router), for the addon's routes
``observability/``     one view of the instance (``instance_view``) as Prometheus text
                       (``metrics``) and the dashboard's figures (``dashboard``)
``cli/``               the ``odoo-pool`` command (``main``): ``top``, ``check``
``devtools/``          demo, tests and benchmarks only: ``embedded_pg``,
                       ``embedded_pgbouncer``, ``odoo_runner``, ``demo``, ``pytest_plugin``
"""
# The one version of the distribution (pyproject.toml reads it) and of the addon (its
# manifest says the same x.y.z; Odoo shows <series>.x.y.z): docs/development.rst.
__version__ = '1.1.0'
