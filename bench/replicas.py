"""Replica benchmark: a read-heavy load on a primary and two streaming replicas, side by
side in one run: where the read-only transactions ran, how many connections each server
held, what fell back to the primary, and how many reads missed the session's own write.

Arms (same servers, same databases, same load, in turn; --rounds interleaves them):
  primary      no replica routing: every transaction on the primary (stock Odoo 16/17, and
               18/19 without db_replica_host)
  one-replica  stock Odoo 18/19's routing: read-only transactions on db_replica_host (the
               first replica), whatever its lag, no read-your-writes
  db_pooling   db_replicas = both replicas (weight 1 each), lag-aware, read-your-writes on
               (db_pool_replica_read_your_writes), shared budget --budget
The primary and one-replica arms use Odoo's own pool when a tree is found (as the stock
arms of footprint.py), db_pooling's pool per process with stock's policy otherwise.

The load: W forked workers, each serving one request at a time for one of S sessions per
worker (think time 5-30 ms): --read-share of the requests are read-only transactions (a
dozen reads on a random database, one of them asking the server's port), the others write
(a dozen reads and two inserts, on the primary), and each write is followed, --reload-after
seconds later (default 10 ms), by a read-only transaction of the same session on the same
database, as the web client reloads a record it saved (Odoo 16; 17+ read it back in the
same call). A session's read-only transaction also looks for the row its last write
inserted on that database: not finding it is a stale read.

Figures: read-only transactions/s, their p50/p99, the share served by replicas (by
inet_server_port(), so every arm is counted the same way), peak connections of role odoo on
the primary and on each replica (pg_stat_activity every 0.1 s), stale reads, and for
db_pooling the fallbacks to the primary by reason (instance-wide, from the shared state).

Run: python bench/replicas.py
"""
import argparse
import os
import random
import signal
import sys
import tempfile
import time
import json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import footprint  # noqa: E402
from bench._common import (ServerCounters, latency_figures, merge_rounds,  # noqa: E402
                           print_table, stock_pool_class, write_json)
from odoo_pool_patch.devtools.demo import APP, error_kind  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.config.options import Settings  # noqa: E402
from odoo_pool_patch.pool.connection_pool import ConnectionPool  # noqa: E402

ARMS = ('primary', 'one-replica', 'db_pooling')
COLUMNS = [('arm', 'arm', ''), ('ro_per_s', 'ro tx/s', '.1f'), ('p50_ms', 'ro p50 ms', '.2f'),
           ('p99_ms', 'ro p99 ms', '.2f'), ('replica_share', 'on replicas', '.0%'),
           ('primary_peak', 'primary cnx', 'd'), ('replica_peak', 'replica cnx', ''),
           ('stale', 'stale reads', 'd'), ('fallbacks', 'fallbacks', ''), ('errors', 'errors', 'd')]
STOCK_POLICY = Settings(idle_timeout=600, wait_timeout=0, max_lifetime=0)


def make_databases(cluster, count):
    """footprint.py's databases, with an index on the column the reads filter on."""
    names = footprint.make_databases(cluster, count)
    for name in names:
        cluster.sql('CREATE INDEX ON demo_order (customer)', dbname=name)
    return names


class Pools:
    """The read-only and read/write pools of one worker process, per arm."""

    def __init__(self, arm, servers, args, stock_class, session):
        primary, replicas = servers[0], servers[1:]
        self.base = {'host': primary.host, 'port': primary.port, 'user': 'odoo',
                     'application_name': f'{APP}-{arm}'}
        self.ro_port = replicas[0].port if arm == 'one-replica' else primary.port
        self.router = None
        if arm != 'db_pooling':
            make = (lambda: stock_class(64)) if stock_class else (
                lambda: ConnectionPool(64, settings=STOCK_POLICY))
            self.ro, self.rw = make(), make()
            return
        from odoo_pool_patch.shared.budget import SharedBudget
        from odoo_pool_patch.shared.exchange import attach as attach_exchange
        from odoo_pool_patch.replicas.replica_health import start_routing
        from odoo_pool_patch.replicas.router import written_lsn
        from odoo_pool_patch.shared.shared_state import SharedState
        settings = Settings(idle_timeout=args.idle_timeout)
        budget = SharedBudget(SharedState(args.segment), args.budget, min_idle=1, role='http')
        attach_exchange(budget, settings)      # as in Odoo (db_pool_shared_idle)
        self.router = start_routing(budget.state, targets_of(servers), settings, {'user': 'odoo'},
                                    required_lsn=lambda: session['lsn'].get(session['id']))
        self.ro = ConnectionPool(64, readonly=True, settings=settings, budget=budget)
        self.rw = ConnectionPool(64, settings=settings, budget=budget)
        self.ro.router = self.rw.router = self.router
        self.written_lsn = written_lsn

    def info(self, database, readonly):
        port = self.ro_port if readonly and self.router is None else self.base['port']
        return dict(self.base, port=port, database=database)


def _serve(arm, servers, databases, args, stock_class, stop_at, seed, out):
    """Body of one forked worker: requests until ``stop_at``, then its figures on ``out``."""
    rng = random.Random(seed)
    sessions = [{'last_id': {}} for _ in range(args.sessions)]
    current = {'id': None, 'lsn': {}}
    pools = Pools(arm, servers, args, stock_class, current)
    stats = {'latency': [], 'ports': {}, 'stale': 0, 'errors': {}, 'writes': 0}
    follow = None
    while time.time() < stop_at:
        if follow:      # the web client reloads the record it just saved
            number, database = follow
            readonly, follow = True, None
        else:
            number, database = rng.randrange(len(sessions)), rng.choice(databases)
            readonly = rng.random() < args.read_share
        session, current['id'] = sessions[number], number
        pool = pools.ro if readonly else pools.rw
        started = time.perf_counter()
        try:
            cnx = pool.borrow(pools.info(database, readonly))
            try:
                with cnx.cursor() as cur:
                    cur.execute('SELECT inet_server_port()')
                    port = cur.fetchone()[0]
                    for _ in range(11):
                        cur.execute('SELECT count(*), max(amount) FROM demo_order '
                                    'WHERE customer = %s', [rng.randint(1, 50)])
                        cur.fetchall()
                    if readonly:
                        last = session['last_id'].get(database)
                        if last is not None:
                            cur.execute('SELECT count(*) FROM demo_order WHERE id = %s', [last])
                            stats['stale'] += cur.fetchone()[0] == 0
                    else:
                        for _ in range(2):
                            cur.execute('INSERT INTO demo_order (customer, amount) VALUES '
                                        '(%s, %s) RETURNING id', [rng.randint(1, 50), rng.random()])
                            session['last_id'][database] = cur.fetchone()[0]
                if readonly:
                    cnx.rollback()
                else:
                    cnx.commit()
                    if pools.router is not None:     # what db_pooling keeps in the Odoo session
                        current['lsn'][number] = pools.written_lsn(cnx)
                        cnx.commit()
            finally:
                pool.give_back(cnx)
            if readonly:
                stats['latency'].append(time.perf_counter() - started)
                stats['ports'][port] = stats['ports'].get(port, 0) + 1
            else:
                stats['writes'] += 1
                follow = (number, database)
        except Exception as exc:    # noqa: BLE001 - counted, the load goes on
            kind = error_kind(exc)
            stats['errors'][kind] = stats['errors'].get(kind, 0) + 1
        time.sleep(args.reload_after if follow else rng.uniform(0.005, 0.03))
    for pool in {id(pools.ro): pools.ro, id(pools.rw): pools.rw}.values():
        if hasattr(pool, 'stats') and hasattr(pool.stats, 'as_dict'):     # db_pooling's
            for name in ('borrows', 'reused', 'opened'):
                stats.setdefault('pool', {})[name] = (stats.get('pool', {}).get(name, 0)
                                                      + getattr(pool.stats, name))
    if pools.router is not None:
        pools.router.monitor.flush()        # this process's counters into the shared rows
    with os.fdopen(out, 'w') as handle:
        json.dump(stats, handle)
    signal.sigwait({signal.SIGTERM})        # like an idle Odoo worker, keeps its pools
    os._exit(0)


def run_arm(arm, servers, counters, databases, args, stock_class):
    stop_at = time.time() + args.seconds
    children = []
    for number in range(args.workers):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                # pragma: no cover - child
            try:
                os.close(read)
                _serve(arm, servers, databases, args, stock_class, stop_at, number, write)
            finally:
                os._exit(1)
        os.close(write)
        children.append((pid, read))
    peaks = [0] * len(servers)
    try:
        while time.time() < stop_at:
            for i, server_counters in enumerate(counters):
                peaks[i] = max(peaks[i], server_counters.connections(f'{APP}-{arm}'))
            time.sleep(0.1)
        merged = {'latency': [], 'ports': {}, 'stale': 0, 'errors': {}, 'writes': 0}
        for _, read in children:
            with os.fdopen(read) as handle:
                stats = json.loads(handle.read() or '{"errors": {"worker died": 1}}')
            merged['latency'] += stats.get('latency', [])
            merged['stale'] += stats.get('stale', 0)
            merged['writes'] += stats.get('writes', 0)
            for key in ('ports', 'errors', 'pool'):
                merged.setdefault(key, {})
                for name, n in stats.get(key, {}).items():
                    merged[key][name] = merged[key].get(name, 0) + n
        fallbacks = fallback_counts(args, servers) if arm == 'db_pooling' else None
    finally:
        for pid, _ in children:
            os.kill(pid, signal.SIGTERM)
        for pid, _ in children:
            os.waitpid(pid, 0)
    reads = sum(merged['ports'].values())
    on_replicas = sum(n for port, n in merged['ports'].items() if int(port) != servers[0].port)
    row = {'arm': arm, 'reads': reads, 'writes': merged['writes'],
           'replica_share': on_replicas / reads if reads else None,
           'served_by_port': merged['ports'], 'primary_peak': peaks[0],
           'replica_peak': '/'.join(map(str, peaks[1:])), 'replica_peaks': peaks[1:],
           'stale': merged['stale'], 'errors': sum(merged['errors'].values()),
           'pool': merged.get('pool', {}),
           'error_kinds': merged['errors'],
           'fallbacks': describe_fallbacks(fallbacks), 'fallback_counts': fallbacks}
    figures = latency_figures(merged['latency'], args.seconds)
    row.update(ro_per_s=figures['per_s'], p50_ms=figures['p50_ms'], p99_ms=figures['p99_ms'])
    pool = row['pool']
    print(f'  {arm:<12} {reads} read-only, {merged["writes"]} writes, '
          f'{row["replica_share"] or 0:.0%} on replicas, stale {row["stale"]}'
          + (f'; {pool["opened"]} connections opened for {pool["borrows"]} borrows'
             if pool else ''), flush=True)
    return row


def fallback_counts(args, servers):
    """Reads the primary served instead of a replica, by reason, instance-wide."""
    from odoo_pool_patch.replicas.replica_health import ServerTable
    from odoo_pool_patch.shared.shared_state import SharedState
    rows = ServerTable(SharedState(args.segment, create=False), targets_of(servers)).status()
    return rows[0]['fallbacks']


def targets_of(servers):
    """Routing targets of the benchmark's servers: the primary, then the replicas, weight 1."""
    from odoo_pool_patch.replicas.router import Target
    return [Target(0, servers[0].host, servers[0].port, 0, 'primary')] + [
        Target(i, r.host, r.port, 1) for i, r in enumerate(servers[1:], 1)]


def describe_fallbacks(counts):
    """'pinned 572' for the table; n/a for the arms without db_pooling's routing."""
    if counts is None:
        return 'n/a'
    return ', '.join(f'{reason} {n}' for reason, n in counts.items() if n) or 'none'


def merge(label, runs):
    if not runs:
        return {'arm': label}
    # Each round has a shared state of its own: its fallbacks add up.
    routed = runs[0]['fallback_counts'] is not None
    row = merge_rounds(label, runs, worst=('primary_peak',), total=('errors', 'stale', 'reads',
                                                                    'writes'),
                       mean=('ro_per_s', 'p50_ms', 'p99_ms'),
                       counts=('error_kinds', 'pool') + (('fallback_counts',) if routed else ()))
    reads = sum(r['reads'] for r in runs)
    on_replicas = sum(r['replica_share'] * r['reads'] for r in runs if r['replica_share'])
    row['replica_share'] = on_replicas / reads if reads else None
    peaks = [max(r['replica_peaks'][i] for r in runs) for i in range(len(runs[0]['replica_peaks']))]
    row['replica_peak'] = '/'.join(map(str, peaks))
    row['fallbacks'] = describe_fallbacks(row.get('fallback_counts'))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=8)
    parser.add_argument('--databases', type=int, default=2)
    parser.add_argument('--sessions', type=int, default=20, help='sessions per worker')
    parser.add_argument('--read-share', type=float, default=0.8,
                        help='share of requests that are read-only transactions (not counting '
                             'the reads that follow each write)')
    parser.add_argument('--reload-after', type=float, default=0.01,
                        help='seconds between a write and the read-only reload that follows it')
    parser.add_argument('--seconds', type=float, default=10.0, help='seconds of load per arm')
    parser.add_argument('--idle-timeout', type=float, default=60.0)
    parser.add_argument('--budget', type=int, default=None,
                        help='db_pooling shared budget (default W + 4)')
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--no-odoo', action='store_true', help='no Odoo pool in the stock arms')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    stock_class, series = stock_pool_class(args.no_odoo)
    args.budget = args.budget or args.workers + 4
    arms = [arm for arm in args.arms.split(',') if arm]
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f'unknown arm(s) {", ".join(sorted(unknown))}: choose among {", ".join(ARMS)}')
    # synchronous_commit on, as on a production server: the test clusters' "off" lets the WAL
    # writer flush (and so stream) a commit up to 200 ms late, which no replica could beat.
    primary = Cluster('bench-replicas', settings={'synchronous_commit': 'on'}).init().start()
    servers, counters = [primary], []
    segments = []
    try:
        databases = make_databases(primary, args.databases)
        servers += [primary.make_replica(f'bench-replica{i}') for i in (1, 2)]
        counters = [ServerCounters(server) for server in servers]
        print(f'{args.workers} workers x {len(databases)} databases, {args.read_share:.0%} '
              f'read-only, {args.seconds:g} s per arm; primary :{primary.port}, replicas '
              f':{servers[1].port} :{servers[2].port}; stock pool = '
              f'{"Odoo " + series if series else "db_pooling with stock policy"}; '
              f'budget {args.budget}')
        results = {}
        for number in range(args.rounds):
            shift = number % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                args.segment = tempfile.mktemp(prefix='dbpool-bench-replicas-')
                segments.append(args.segment)
                results.setdefault(arm, []).append(
                    run_arm(arm, servers, counters, databases, args, stock_class))
                time.sleep(1.0)
        rows = [merge(arm, results.get(arm)) for arm in arms]
    finally:
        for server_counters in counters:
            server_counters.close()
        for server in reversed(servers):
            server.destroy()
        for path in segments:
            if os.path.exists(path):
                os.unlink(path)
    print()
    print_table(COLUMNS, rows)
    write_json('replicas', {'odoo': series, 'args': {k: v for k, v in vars(args).items()
                                                     if k != 'segment'}, 'rows': rows}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
