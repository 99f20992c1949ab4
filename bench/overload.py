"""Overload benchmark: demand at 4x the connection budget, errors and wait times per arm,
side by side in one run.

The server accepts at most --budget + 3 connections of role odoo (``ALTER ROLE odoo
CONNECTION LIMIT``), as a database sized for that budget would (the 3 spare let
PgBouncer open a server connection while one it closed is still exiting). W worker processes
of T threads each (W x T = 4 x budget by default) run Odoo-like transactions back to
back, each holding its connection --hold s longer (pg_sleep) so that demand really
is 4x what the server takes.

Arms (in turn; --rounds interleaves them):
  stock       odoo.sql_db.ConnectionPool (db_maxconn 64 per process) straight to the server:
              beyond the limit connections are refused ("too many connections"); n/a
              without Odoo
  pgbouncer   the same stock pool through PgBouncer in transaction mode with
              max_user_connections = budget: clients queue inside PgBouncer
  shared      db_pooling with the shared budget = --budget, db_pool_wait_timeout
              = --wait-timeout: borrowers queue for a slot

Figures: transactions per second, errors (by kind in the JSON), borrow wait p50/p99/max
(time to get a connection from the pool; PgBouncer's queueing shows in the latency
instead), transaction latency p50/p99, peak server connections sampled every 0.05 s,
and whether the peak exceeded the budget.

Run: python bench/overload.py [--seconds 60]   (re-runs itself under Odoo's interpreter)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import print_table, stock_pool_class, write_json  # noqa: E402
from bench.footprint import (STOCK_POLICY, interleaved_arms, measure, servers,  # noqa: E402
                             stock_factory)
from odoo_pool_patch.devtools import demo  # noqa: E402
from odoo_pool_patch.config.options import Settings  # noqa: E402

COLUMNS = [('arm', 'arm', ''), ('per_s', 'tx/s', '.1f'), ('errors', 'errors', 'd'),
           ('wait_p50_ms', 'wait p50 ms', '.1f'), ('wait_p99_ms', 'wait p99 ms', '.1f'),
           ('wait_max_ms', 'wait max ms', '.1f'), ('p50_ms', 'p50 ms', '.1f'),
           ('p99_ms', 'p99 ms', '.1f'), ('peak', 'peak cnx', 'd'), ('over', 'over budget', '')]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--budget', type=int, default=12)
    parser.add_argument('--workers', type=int, default=8)
    parser.add_argument('--threads', type=int, default=None,
                        help='threads per worker (default: 4 x budget / workers)')
    parser.add_argument('--databases', type=int, default=6)
    parser.add_argument('--seconds', type=float, default=60.0, help='seconds of overload per arm')
    parser.add_argument('--hold', type=float, default=0.02,
                        help='extra seconds each transaction holds its connection')
    parser.add_argument('--wait-timeout', type=float, default=20.0,
                        help='db_pool_wait_timeout of the shared arm (default 20, the default)')
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--no-odoo', action='store_true')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    stock_class, series = stock_pool_class(args.no_odoo)
    args.threads = args.threads or max(-(-4 * args.budget // args.workers), 1)
    args.rest = 0.5
    demand = args.workers * args.threads

    bouncer_settings = {'max_user_connections': args.budget, 'server_idle_timeout': 1}
    with servers('bench-overload', args.databases, bouncer_settings,
                 connection_limit=args.budget + 3) as (cluster, databases, bouncer, counters,
                                                       segment):
        ours = Settings(wait_timeout=args.wait_timeout, idle_timeout=5)
        arms = [
            ('stock', stock_factory(stock_class) if stock_class else None, None),
            ('pgbouncer', stock_factory(stock_class) if stock_class else demo.ours(STOCK_POLICY),
             bouncer),
            ('shared', demo.ours(ours, (segment, args.budget)), None),
        ]
        print(f'demand {demand} concurrent transactions ({args.workers} workers x {args.threads} '
              f'threads, each holding its connection +{args.hold:g} s) for a budget of '
              f'{args.budget}; {args.seconds:g} s per arm; stock = Odoo {series or "n/a"}')
        rows = interleaved_arms(arms, args.rounds, lambda label, make_pool, dsn: measure(
            cluster, counters, databases, label, make_pool, args, dsn,
            threads=args.threads, think=(0.0, 0.002), hold=args.hold))
    for row in rows:
        if 'peak' in row:
            row['over'] = 'YES' if row['peak'] > args.budget else 'no'
    print()
    print_table(COLUMNS, rows)
    for row in rows:
        if row.get('errors'):
            print(f'  {row["arm"]}: errors {row["error_kinds"]}')
    write_json('overload', {'odoo': series, 'demand': demand, 'args': vars(args),
                            'rows': rows}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
