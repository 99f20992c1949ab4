"""Footprint benchmark: server connections, latency and connection churn of W worker
processes x D databases under Odoo-like transactions, side by side in one run.

Arms (same PostgreSQL, same databases, same load, in turn; --rounds interleaves them):
  stock       odoo.sql_db.ConnectionPool of the Odoo tree found (ODOO_PATH, else the newest
              /opt/odoo tree), db_maxconn 64 per process; n/a without Odoo
  pgbouncer   the same stock pool connecting through PgBouncer in transaction mode (defaults,
              server_idle_timeout = --idle-timeout); without Odoo, db_pooling per process with
              stock's policy stands in for the stock pool (marked in the JSON)
  per-proc    db_pooling, db_pool_shared = off, db_pool_idle_timeout = --idle-timeout
  shared      db_pooling with the shared budget (--budget, default workers + 4: the default
              db_pool_max_connections for these workers and 1 cron worker), min_idle 1

The load is demo.run_arm: W forked workers each serving one transaction at a time (a
dozen reads and two writes on a random database of D, then 5-30 ms think time), so at
most W transactions run at once. Figures: server connections of role odoo sampled from
pg_stat_activity every 0.1 s (peak and mean under load; "at rest" 2 idle timeouts after
the load stops), transactions per second, p50/p99 latency (borrow included), errors,
and server sessions opened per second of load (pg_stat_database.sessions).

Run: python bench/footprint.py   (re-runs itself under Odoo's interpreter when a tree is found)
"""
import argparse
import contextlib
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (ServerCounters, interleaved, latency_figures,  # noqa: E402
                           merge_rounds, print_table, percentile, sessions_opened, stock_pool_class,
                           write_json)
from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer  # noqa: E402
from odoo_pool_patch.devtools import demo  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.config.options import Settings  # noqa: E402

COLUMNS = [('arm', 'arm', ''), ('peak', 'peak', 'd'), ('mean', 'mean', '.1f'),
           ('at_rest', 'at rest', 'd'), ('per_s', 'tx/s', '.1f'), ('p50_ms', 'p50 ms', '.2f'),
           ('p99_ms', 'p99 ms', '.2f'), ('errors', 'errors', 'd'), ('new_per_s', 'new cnx/s', '.1f')]
STOCK_POLICY = Settings(idle_timeout=600, wait_timeout=0, max_lifetime=0)


def make_databases(cluster, count):
    cluster.create_role('odoo')
    databases = [f'bench_db{i}' for i in range(1, count + 1)]
    for name in databases:
        cluster.create_database(name)
        cluster.sql('CREATE TABLE demo_order (id serial PRIMARY KEY, customer int, amount float)',
                    dbname=name)
        cluster.sql('INSERT INTO demo_order (customer, amount) SELECT g % 50, g FROM '
                    'generate_series(1, 2000) g', dbname=name)
        cluster.sql('ALTER TABLE demo_order OWNER TO odoo', dbname=name)
    return databases


def restore_databases(cluster, databases):
    """Put every benchmark table back to its 2000 initial rows, so that each arm scans the
    same data (the load inserts two rows per transaction: without this, later arms would
    read bigger tables than earlier ones)."""
    for name in databases:
        cluster.sql('DELETE FROM demo_order WHERE id > 2000', dbname=name)
        cluster.sql('VACUUM ANALYZE demo_order', dbname=name)


def stock_factory(stock_class, maxconn=64):
    return lambda: stock_class(maxconn)


def measure(cluster, counters, databases, label, make_pool, args, dsn=None, **load):
    """One arm: demo.run_arm (``load``: its threads, think, hold) plus latency and borrow
    wait figures and the server sessions it opened."""
    restore_databases(cluster, databases)
    time.sleep(1.0)             # the restoring sessions' statistics reach pg_stat_database
    before = counters.sessions()
    row = demo.run_arm(cluster, databases, label, make_pool, args.workers, args.seconds,
                       args.rest, dsn=dsn, interval=0.05, count=counters.connections,
                       quiet=True, **load)
    # Every arm starts on a clean server, so all connections of role odoo are its own
    # (PgBouncer's server connections lose their application_name at each reset):
    # PgBouncer closes its idle ones after server_idle_timeout. Backends flush their
    # statistics within a second.
    deadline = time.monotonic() + 15
    while counters.connections() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.2)
    row['sessions_opened'] = sessions_opened(before, counters.sessions())
    row['new_per_s'] = sum(row['sessions_opened'].values()) / args.seconds
    row.update(latency_figures(row.pop('latency'), args.seconds))
    waits = sorted(row.pop('wait'))
    for name, fraction in (('wait_p50_ms', 0.5), ('wait_p99_ms', 0.99), ('wait_max_ms', 1.0)):
        row[name] = percentile(waits, fraction) * 1000 if waits else None
    row['errors'], row['error_kinds'] = sum(row['errors'].values()), row['errors']
    del row['samples']
    print(f'  {label:<10} peak {row["peak"]:3d}  at rest {row["at_rest"]:3d}  '
          f'{row["per_s"]:7.1f} tx/s  errors {row["errors"]}', flush=True)
    return row


@contextlib.contextmanager
def servers(name, databases, bouncer_settings, connection_limit=None):
    """A cluster with ``databases`` benchmark databases (role odoo limited to
    ``connection_limit`` connections), a PgBouncer in front of it, the counters and a
    shared-state path: yields (cluster, database names, PgBouncer DSN, counters, path)."""
    cluster = Cluster(name).init().start()
    bouncer = counters = None
    segment = tempfile.mktemp(prefix='dbpool-bench-')
    try:
        names = make_databases(cluster, databases)
        if connection_limit:
            # Superusers ignore the limit: as most Odoo roles, odoo need not be one.
            cluster.sql(f'ALTER ROLE odoo NOSUPERUSER CONNECTION LIMIT {int(connection_limit)}')
        bouncer = PgBouncer(cluster, settings=bouncer_settings).start()
        counters = ServerCounters(cluster)
        yield (cluster, names, {'host': bouncer.host, 'port': bouncer.port, 'user': 'odoo'},
               counters, segment)
    finally:
        if counters:
            counters.close()
        if bouncer:
            bouncer.destroy()
        cluster.destroy()
        for path in glob.glob(segment + '*'):
            os.unlink(path)


def interleaved_arms(arms, rounds, run):
    """``run(label, make_pool, dsn)`` for every arm (n/a: ``make_pool`` None) ``rounds``
    times, interleaved (see ``_common.interleaved``); one merged row per arm."""
    present = {label: (make_pool, dsn) for label, make_pool, dsn in arms
               if make_pool is not None}
    results = interleaved(list(present), rounds,
                          lambda label, _number: run(label, *present[label]))
    return [merge_rounds(label, results.get(label)) for label, _, _ in arms]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=8)
    parser.add_argument('--databases', type=int, default=6)
    parser.add_argument('--seconds', type=float, default=10.0, help='seconds of load per arm')
    parser.add_argument('--idle-timeout', type=float, default=3.0,
                        help='db_pool_idle_timeout and PgBouncer server_idle_timeout (s)')
    parser.add_argument('--budget', default=None,
                        help='shared budget, or several comma-separated for one shared arm each '
                             '(default W + 4)')
    parser.add_argument('--rounds', type=int, default=1, help='interleaved runs of every arm')
    parser.add_argument('--no-odoo', action='store_true', help='no stock Odoo arm')
    parser.add_argument('--arms', default='stock,pgbouncer,per-proc,shared',
                        help='which arms to run (comma-separated)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    stock_class, series = stock_pool_class(args.no_odoo)
    args.rest = 2 * args.idle_timeout + 1.5     # + the maintenance tick and backend exit
    budgets = str(args.budget).split(',') if args.budget else [str(args.workers + 4)]

    bouncer_settings = {'server_idle_timeout': max(1, round(args.idle_timeout))}  # 0: never
    with servers('bench-footprint', args.databases, bouncer_settings) as (
            cluster, databases, bouncer, counters, segment):
        ours = Settings(idle_timeout=args.idle_timeout)
        arms = [
            ('stock', stock_factory(stock_class) if stock_class else None, None),
            ('pgbouncer', stock_factory(stock_class) if stock_class else demo.ours(STOCK_POLICY),
             bouncer),
            ('per-proc', demo.ours(ours), None),
        ] + [('shared' if len(budgets) == 1 else f'shared-{budget}',
               demo.ours(ours, (f'{segment}-{number}', int(budget))), None)
             for number, budget in enumerate(budgets)]
        print(f'{args.workers} workers x {len(databases)} databases, {args.seconds:g} s of load '
              f'per arm, rest {args.rest:g} s; stock = Odoo {series or "n/a"}; budget {", ".join(map(str, budgets))}')
        wanted = args.arms.split(',')
        arms = [arm for arm in arms if arm[0] in wanted or arm[0].split('-')[0] in wanted]
        rows = interleaved_arms(arms, args.rounds, lambda label, make_pool, dsn: measure(
            cluster, counters, databases, label, make_pool, args, dsn))
    print()
    print_table(COLUMNS, rows)
    for row in rows:
        if row.get('sessions_opened'):
            print(f'  {row["arm"]}: sessions opened per database {row["sessions_opened"]}'
                  + (f'; errors {row["error_kinds"]}' if row['errors'] else ''))
    write_json('footprint', {'odoo': series, 'budget': budgets, 'args': vars(args),
                             'pgbouncer_client_pool': 'odoo stock' if stock_class else
                             'db_pooling per process with stock policy', 'rows': rows}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
