"""Micro benchmark: the cost of borrow + give_back, side by side in one run.

Arms (same process, same PostgreSQL, same DSN):
  stock      odoo.sql_db.ConnectionPool of the Odoo tree found (ODOO_PATH or /opt/odoo/*),
             n/a without Odoo
  per-proc   db_pooling's pool, db_pool_shared = off
  shared     db_pooling's pool with the shared budget on

Rows:
  reuse      borrow + give_back of a pooled connection; both pools reset it on reuse
             (ABORT/DISCARD ALL, one round trip), as stock Odoo does
  bookkeep   the same with the reset round trip taken out of both pools
             (cnx.reset replaced by a no-op on the test connection): pool overhead only
  budget     a slot of the shared budget taken and given back (acquire + release)
  handover   the shared arm only, reset smart: the give_back parks the connection (another
             process wants its database: the lot's demand cells say so) and the borrow
             unparks it, through the same locked steps, descriptor passing and stand-in
             shell as between two workers: the CPU cost of moving a session between
             processes (one park + one unpark), pool bookkeeping included

Each figure is the median (or, with --stat min, the minimum: steadier on a shared machine,
where other work only ever adds time) over --runs runs of the mean per operation over
--iterations operations, in microseconds. Run: python bench/micro.py   (re-runs itself under Odoo's
interpreter when an Odoo tree is found, so the stock arm is measured in the same process).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from odoo_pool_patch.shared import shared_state as ss  # noqa: E402
from odoo_pool_patch.shared.budget import SharedBudget  # noqa: E402
from odoo_pool_patch.shared.exchange import attach as attach_exchange  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.config.options import Settings  # noqa: E402
from odoo_pool_patch.pool.connection_pool import ConnectionPool  # noqa: E402

ALWAYS = Settings(reset='always')


STAT = statistics.median


def per_op(function, iterations, runs):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(iterations):
            function()
        samples.append((time.perf_counter() - start) / iterations * 1e6)
    return STAT(samples)


def measure_pool(pool, info, iterations, runs, reset):
    cnx = pool.borrow(info)
    pool.give_back(cnx)
    if not reset:
        cnx.reset = lambda: None        # only this connection, only for this row

    def cycle():
        pool.give_back(pool.borrow(info))
    try:
        return per_op(cycle, iterations, runs)
    finally:
        if not reset:
            del cnx.reset


def measure_handover(budget, info, iterations, runs):
    pool = ConnectionPool(64, budget=budget, settings=Settings(reset='smart'))
    cnx = pool.borrow(info)
    parking = budget.exchange.parking
    khash = cnx.pooled.khash
    parking.want(khash)                 # claims the database's lot
    lot = next(row for row in ss.Lot.all(budget.state.cells) if row.hash == khash)
    # Demand from another process (pid 1), renewed far into the future: every give-back
    # parks, as under a load where other workers keep asking for this database.
    lot.want_pid, lot.want_ms = 1, int(time.monotonic() * 1000) + 10 ** 9
    pool.give_back(cnx)
    parked = pool.stats.parked

    def cycle():
        pool.give_back(pool.borrow(info))
    try:
        return per_op(cycle, iterations, runs)
    finally:
        moved = pool.stats.parked - parked
        pool.close_all()
        assert moved >= iterations * runs, f'only {moved} parks: not a hand-over each time'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iterations', type=int, default=2000)
    parser.add_argument('--runs', type=int, default=15)
    parser.add_argument('--json', default=os.path.join(ROOT, 'bench', 'results', 'micro.json'))
    parser.add_argument('--no-odoo', action='store_true', help='skip the stock Odoo arm')
    parser.add_argument('--stat', choices=('median', 'min'), default='median',
                        help='figure of the runs (min: to compare two versions on a busy machine)')
    args = parser.parse_args(argv)
    global STAT
    STAT = min if args.stat == 'min' else statistics.median

    stock_class, series = None, None
    if not args.no_odoo:
        try:
            from odoo import release, sql_db
            stock_class, series = sql_db.ConnectionPool, release.serie
        except ImportError:
            from odoo_pool_patch.devtools.odoo_runner import available_trees
            trees, _ = available_trees()
            if trees:       # re-run under the newest Odoo's interpreter, same arguments
                tree = trees[-1]
                os.execve(tree.python, [tree.python, __file__, *sys.argv[1:]],
                          tree.env())

    cluster = Cluster('micro').init().start()
    segment = tempfile.mktemp(prefix='dbpool-micro-')
    try:
        cluster.create_role('odoo')
        cluster.create_database('micro')
        # An ordinary database: its idle connections are offered to other processes
        # (db_pool_shared_idle), so the shared arm pays for publishing the offers.
        info = {'database': 'micro', 'user': 'odoo', 'host': cluster.host,
                'port': cluster.port, 'application_name': 'micro'}
        budget = SharedBudget(ss.SharedState(segment), 64, role='http')
        attach_exchange(budget, ALWAYS)
        arms = {
            'stock': stock_class(64) if stock_class else None,
            # db_pool_reset = always: the same reset as stock (bench/session_reset.py
            # measures what smart mode saves).
            'per-proc': ConnectionPool(64, settings=ALWAYS),
            'shared': ConnectionPool(64, budget=budget, settings=ALWAYS),
        }
        rows = {}
        for row, reset in (('reuse', True), ('bookkeep', False)):
            rows[row] = {name: (measure_pool(pool, info, args.iterations, args.runs, reset)
                                if pool is not None else None) for name, pool in arms.items()}

        def slot():
            budget.try_acquire(1)
            budget.release()
        rows['budget'] = {'stock': None, 'per-proc': None,
                          'shared': per_op(slot, args.iterations, args.runs)}
        rows['handover'] = {'stock': None, 'per-proc': None,
                            'shared': measure_handover(budget, info, args.iterations, args.runs)}
    finally:
        cluster.destroy()
        if os.path.exists(segment):
            os.unlink(segment)

    def cell(value):
        return f'{value:10.2f}' if value is not None else f'{"n/a":>10}'
    print(f'borrow + give_back, microseconds per operation ({args.stat} of {args.runs} runs x '
          f'{args.iterations}); stock = Odoo {series or "n/a"}; Python {sys.version.split()[0]}')
    print(f'{"row":<10}{"stock":>10}{"per-proc":>10}{"shared":>10}{"shared/per-proc":>17}')
    for row, values in rows.items():
        ratio = (f'{values["shared"] / values["per-proc"]:17.2f}'
                 if values['per-proc'] else f'{"":>17}')
        print(f'{row:<10}{cell(values["stock"])}{cell(values["per-proc"])}'
              f'{cell(values["shared"])}{ratio}')
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, 'w') as handle:
        json.dump({'date': time.strftime('%Y-%m-%d'), 'odoo': series, 'rows': rows,
                   'iterations': args.iterations, 'runs': args.runs, 'stat': args.stat}, handle, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
