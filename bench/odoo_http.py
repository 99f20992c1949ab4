"""Real Odoo benchmark: a prefork server (8 HTTP workers, 1 cron worker) on 6 databases
under concurrent JSON-RPC reads and writes, side by side in one run.

Arms (same PostgreSQL, same databases, same load; one Odoo server each, in turn):
  stock       stock Odoo, its own pool in every worker
  db_pooling  Odoo with db_pooling loaded server-wide (default budget, idle timeout --idle-timeout)
  pgbouncer   stock Odoo connecting through PgBouncer in transaction mode (its defaults,
              server_idle_timeout = --idle-timeout so that "at rest" compares like with like)

The load is demo._drive_odoo: --clients threads, each a search_read of 20 partners on a
random database and one time in five a create; --warmup s unmeasured, --seconds s
measured, --rest s observed after. --load web (default): as the web client, each client
logged in once per database, /web/dataset/call_kw with the session cookie (read-only
cursors on Odoo 18+); --load jsonrpc: sessionless /jsonrpc execute_kw. Figures: server
connections of role odoo (peak and mean under load, at rest), requests (a search_read and
its create, if any, count as one), throughput, p50/p99, errors, sessions opened per
second during the measured part, per database ("postgres" is the list_dbs / LISTEN one),
and CPU per HTTP request: of the Odoo server's processes, and of all (Odoo, PostgreSQL's
backends, PgBouncer), read from /proc every 0.2 s during the measured part (a process
that ended counts up to its last reading). --rounds N interleaves the arms N times and
reports every round and the medians.

Run: python bench/odoo_http.py   (Odoo from ODOO_PATH, else the newest /opt/odoo tree)
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (CpuMeter, ServerCounters, interleaved, latency_figures,  # noqa: E402
                           odoo_tree, postmaster_pid, report_rounds, sessions_opened,
                           write_json)
from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer  # noqa: E402
from odoo_pool_patch.devtools.demo import _drive_odoo, odoo_databases  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.devtools.odoo_runner import OdooServer  # noqa: E402

ARMS = ('stock', 'db_pooling', 'pgbouncer')
# More db_pooling arms, on demand (--arms): odoo.conf options on top of the defaults;
# also db_pooling_b<N>: db_pool_max_connections = N.
VARIANTS = {'db_pooling_nocache': {'db_pool_list_dbs_cache': 0},
            'db_pooling_noshare': {'db_pool_shared_idle': 'off'}}
COLUMNS = [('arm', 'arm', ''), ('peak', 'peak', 'd'), ('mean', 'mean', '.1f'),
           ('at_rest', 'at rest', 'd'), ('requests', 'requests', 'd'), ('per_s', 'req/s', '.1f'),
           ('p50_ms', 'p50 ms', '.1f'), ('p99_ms', 'p99 ms', '.1f'), ('errors', 'errors', 'd'),
           ('new_per_s', 'new cnx/s', '.1f'), ('postgres_per_s', 'of which postgres', '.1f'),
           ('odoo_cpu_us', 'Odoo CPU µs/req', '.0f'),
           # of which threads besides the busiest of each process (prefork: db_pooling's own)
           ('side_cpu_us', 'side threads µs/req', '.0f'), ('cpu_us', 'all CPU µs/req', '.0f')]


def pool_counters(path):
    """db_pooling's instance-wide counters (borrows, reused, opened, waits...) of a server."""
    from odoo_pool_patch.shared.shared_state import SharedState
    state = SharedState(path, create=False)
    totals = {}
    for counters in state.counter_totals().values():
        for name, value in counters.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def run_arm(tree, cluster, workdir, databases, arm, args, counters, number=0):
    pooled = arm.startswith('db_pooling')
    options = {'workers': args.workers, 'max_cron_threads': 1}
    if pooled:
        options.update(db_pool_idle_timeout=args.idle_timeout, **VARIANTS.get(arm, {}),
                       **dict(option.split('=', 1) for option in args.pool_option))
        if arm.startswith('db_pooling_b'):      # db_pooling_b16: a budget of 16
            options['db_pool_max_connections'] = int(arm[len('db_pooling_b'):])
    bouncer = None
    if arm == 'pgbouncer':
        bouncer = PgBouncer(cluster, settings={  # 0 would mean never
            'server_idle_timeout': max(1, round(args.idle_timeout))}).start()
        options.update(db_host=bouncer.host, db_port=bouncer.port)
    server = None
    try:
        for attempt in (1, 2):      # a port taken meanwhile by another process: new ports
            server = OdooServer(tree, cluster, workdir, name=f'{arm}-{number}-{attempt}',
                                options=options, load_pooling=pooled)
            try:
                server.start()
                break
            except RuntimeError as exc:
                if attempt == 2:
                    raise
                print(f'  {arm}: Odoo did not start ({str(exc).splitlines()[0]}), retrying')
        before, meters = {}, {}
        groups, parents = [server.proc.pid], [postmaster_pid(cluster)]
        pids = [bouncer.pid()] if bouncer else []

        def on_measure():
            before.update(counters.sessions())
            meters.update(odoo=CpuMeter(groups=groups).start(),
                          side=CpuMeter(groups=groups, side_threads=True).start(),
                          all=CpuMeter(groups=groups, parents=parents, pids=pids).start())

        used = {}
        row = _drive_odoo(server, cluster, databases, arm, args, count=counters.connections,
                          interval=0.25, on_measure=on_measure,
                          on_measured=lambda: used.update(
                              {name: meter.stop() for name, meter in meters.items()}))
        calls = max(row['http_requests'], 1)
        row['odoo_cpu_us'] = 1e6 * used['odoo'] / calls
        row['side_cpu_us'] = 1e6 * used['side'] / calls
        row['cpu_us'] = 1e6 * used['all'] / calls
        # Sessions of the measured part and its rest; counted once every backend has
        # reported them (the statistics are flushed at most once a second).
        time.sleep(1.2)
        opened = sessions_opened(before, counters.sessions())
        row.update(latency_figures(row.pop('latency'), args.seconds))
        row['new_per_s'] = sum(opened.values()) / args.seconds
        row['postgres_per_s'] = opened.get('postgres', 0) / args.seconds
        row['sessions_opened'] = opened
        if pooled:
            row['pool'] = pool_counters(server.options['db_pool_shared_path'])
        return row
    finally:
        if server:
            server.stop()
        if bouncer:
            bouncer.destroy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=8)
    parser.add_argument('--databases', type=int, default=6)
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--load', choices=('web', 'jsonrpc'), default='web',
                        help='web: logged-in web client sessions calling /web/dataset/call_kw '
                             '(default); jsonrpc: sessionless /jsonrpc execute_kw')
    parser.add_argument('--seconds', type=int, default=15, help='measured load per arm')
    parser.add_argument('--warmup', type=int, default=20, help='unmeasured load first')
    parser.add_argument('--idle-timeout', type=float, default=3.0,
                        help='db_pool_idle_timeout and PgBouncer server_idle_timeout (s)')
    parser.add_argument('--rest', type=float, default=None,
                        help='seconds observed after the load (default 2 idle timeouts + 1.5)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='run every arm this many times, interleaved')
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--odoo', help='Odoo source tree (default: ODOO_PATH, else newest /opt/odoo)')
    parser.add_argument('--pool-option', action='append', default=[], metavar='NAME=VALUE',
                        help='extra odoo.conf option for the db_pooling arms')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    args.rest = args.rest if args.rest is not None else 2 * args.idle_timeout + 1.5
    tree, why_not = odoo_tree(args.odoo)
    if tree is None:
        print(f'n/a: {why_not}')
        return 0
    arms = [a for a in args.arms.split(',') if a]

    cluster = Cluster('bench-http').init().start()
    workdir = tempfile.mkdtemp(prefix='dbpool-bench-odoo-')
    os.chmod(workdir, 0o755)
    try:
        cluster.create_role('odoo')
        databases = odoo_databases(tree, cluster, workdir, 'bench_', args.databases)
        counters = ServerCounters(cluster)
        print(f'Odoo {tree.series}, {args.workers} workers + 1 cron, {len(databases)} databases, '
              f'{args.clients} clients, {args.seconds} s measured after {args.warmup} s warm-up')
        results = interleaved(arms, args.rounds, lambda arm, number: run_arm(
            tree, cluster, workdir, databases, arm, args, counters, number))
        counters.close()
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = report_rounds(COLUMNS, results, args.rounds)
    for row in rows:
        print(f'  {row["arm"]}: sessions opened per database {row["sessions_opened"]}'
              + (f'; errors {row["error_kinds"]}' if row['errors'] else ''))
        pool = row.get('pool')
        if pool and pool.get('borrows'):
            print(f'  {row["arm"]}: {pool["borrows"]} borrows (warm-up included), '
                  + ', '.join(f'{pool[name]} {name} ({100 * pool[name] / pool["borrows"]:.0f}%)'
                              for name in ('reused', 'unparked', 'taken', 'opened'))
                  + f', {pool["waits"]} waited for the budget')
    write_json('odoo_http', {'odoo': tree.series, 'args': vars(args), 'rows': rows}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
