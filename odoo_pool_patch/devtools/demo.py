"""``odoo-pool demo``: watch the pool work on this machine, with nothing to set up.

It starts its own PostgreSQL, then runs the same Odoo-like load twice:
once with stock Odoo's pool policy (connections kept idle for 10 minutes,
"The Connection Pool Is Full" at once) and once with db_pooling, and prints
the server connections (from pg_stat_activity) every second, then a
comparison. The load is W forked worker processes, each serving one request
at a time like an Odoo prefork worker: a transaction of a dozen reads and two
writes on a random database out of D.

When an Odoo tree is found (``--odoo PATH``, ``ODOO_PATH``, an importable
odoo, or /opt/odoo/<series>; see ``odoo_runner.available_trees``) it drives a
real Odoo prefork server over JSON-RPC instead, with and without db_pooling
loaded server-wide; ``--simulated`` forces the simulated load.
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

from ..config.options import Settings
from ..pool.connection_pool import ConnectionPool
from .embedded_pg import Cluster

APP = 'odoo-demo'


def odoo_like_transaction(cur, rng):
    """A dozen reads and two writes on the ``demo_order`` table."""
    for _ in range(12):
        cur.execute('SELECT count(*), max(amount) FROM demo_order WHERE customer = %s',
                    [rng.randint(1, 50)])
        cur.fetchall()
    for _ in range(2):
        cur.execute('INSERT INTO demo_order (customer, amount) VALUES (%s, %s)',
                    [rng.randint(1, 50), rng.random() * 100])


def error_kind(exc):
    """How the loads count an error: its type and the first line of its message."""
    return type(exc).__name__ + ': ' + str(exc).strip().split('\n')[0][:120]


def _serve(pool, cluster_dsn, databases, stop_at, rng, think, stats, hold=0.0):
    """One request at a time until ``stop_at``; latency (borrow included) and borrow
    wait of each transaction, and the errors by kind, go into ``stats``. ``hold``:
    seconds of server time (pg_sleep) added to each transaction."""
    while time.time() < stop_at:
        db = rng.choice(databases)
        started = time.perf_counter()
        try:
            cnx = pool.borrow(dict(cluster_dsn, database=db))
            borrowed = time.perf_counter()
            try:
                with cnx.cursor() as cur:
                    odoo_like_transaction(cur, rng)
                    if hold:
                        cur.execute('SELECT pg_sleep(%s)', [hold])
                cnx.commit()
            finally:
                pool.give_back(cnx)
            stats['latency'].append(time.perf_counter() - started)
            stats['wait'].append(borrowed - started)
        except Exception as exc:    # noqa: BLE001 - counted, the load goes on
            kind = error_kind(exc)
            stats['errors'][kind] = stats['errors'].get(kind, 0) + 1
        time.sleep(rng.uniform(*think))     # think time between requests


def _worker(cluster_dsn, databases, make_pool, stop_at, seed, out, threads, think, hold):
    """Body of one forked worker process: ``threads`` request loops on one pool until
    ``stop_at``, then its figures as JSON on the pipe ``out``."""
    pool = make_pool()
    stats = {'latency': [], 'wait': [], 'errors': {}}
    loops = [threading.Thread(target=_serve, args=(pool, cluster_dsn, databases, stop_at,
                                                    random.Random(seed * 1000 + n), think, stats,
                                                    hold))
             for n in range(threads)]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join()
    if hasattr(pool, 'stats') and hasattr(pool.stats, 'as_dict'):
        stats['pool'] = pool.stats.as_dict()       # db_pooling's counters
    with os.fdopen(out, 'w') as handle:
        json.dump(stats, handle)
    # Like an idle Odoo worker: it stays alive and keeps its pool until told to stop.
    signal.sigwait({signal.SIGTERM})
    os._exit(0)


def ours(settings, budget_spec=None, maxconn=64):
    """A pool factory for forked workers: db_pooling, optionally with the shared
    budget ``budget_spec`` = (shared state path, budget size)."""
    parent = {}

    def prepare():
        """In the parent, before the workers fork (as Odoo's master in post_load): the
        shared budget and its exchange, whose parking queues the workers inherit.
        Returns what ends them after the arm."""
        from ..shared.budget import SharedBudget
        from ..shared.shared_state import SharedState
        from ..shared.exchange import attach
        budget = SharedBudget(SharedState(budget_spec[0]), budget_spec[1], min_idle=1,
                              role='master')
        attach(budget, settings)
        parent['budget'] = budget

        def end():
            budget = parent.pop('budget')
            if budget.exchange is not None:
                budget.exchange.close()
        return end

    def make_pool():
        budget = parent.get('budget')
        if budget is not None:
            budget.set_role('http')
        return ConnectionPool(maxconn, settings=settings, budget=budget)
    if budget_spec:
        make_pool.prepare = prepare
    return make_pool


def run_arm(cluster, databases, label, make_pool, workers, seconds, rest, threads=1,
            think=(0.005, 0.03), dsn=None, count=None, interval=1.0, quiet=False, hold=0.0):
    """Fork ``workers`` processes of ``threads`` request loops for ``seconds`` of load,
    sampling the server connections (``count()``, default: this arm's
    application_name) every ``interval`` s during the load and for ``rest`` s after it.

    Returns peak, mean (load), at_rest (last sample), the samples, and the workers'
    latencies, borrow waits and errors merged."""
    dsn = dict(dsn or {'host': cluster.host, 'port': cluster.port, 'user': 'odoo'},
               application_name=f'{APP}-{label}')
    count = count or (lambda: cluster.count_connections(f'{APP}-{label}'))
    stop_at = time.time() + seconds
    children = []
    end = make_pool.prepare() if hasattr(make_pool, 'prepare') else None
    for number in range(workers):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                # pragma: no cover - child
            try:
                os.close(read)
                _worker(dsn, databases, make_pool, stop_at, number, write, threads, think, hold)
            finally:
                os._exit(1)
        os.close(write)
        children.append((pid, read))
    samples, start, shown = [], time.time(), 0.0
    try:
        while time.time() < stop_at + rest:
            now = time.time()
            phase = 'load' if now < stop_at else 'rest'
            samples.append((now - start, phase, count()))
            if not quiet and now - shown >= 1.0:
                shown = now
                print(f'  {label:<10} t={now - start:5.1f}s  {phase}  '
                      f'server connections: {samples[-1][2]:3d} {"#" * samples[-1][2]}', flush=True)
            time.sleep(interval)
        merged = {'latency': [], 'wait': [], 'errors': {}}
        for _, read in children:
            with os.fdopen(read) as handle:
                stats = json.loads(handle.read() or '{}')
            merged['latency'] += stats.get('latency', [])
            merged['wait'] += stats.get('wait', [])
            for kind, n in stats.get('errors', {'worker died': 1}).items():
                merged['errors'][kind] = merged['errors'].get(kind, 0) + n
            for name, n in stats.get('pool', {}).items():
                merged.setdefault('pool', {})[name] = merged.get('pool', {}).get(name, 0) + n
    finally:
        for pid, _ in children:
            os.kill(pid, signal.SIGTERM)
        for pid, _ in children:
            os.waitpid(pid, 0)
        if end is not None:
            end()
    load = [c for _, p, c in samples if p == 'load']
    return {'arm': label, 'peak': max(load or [0]), 'mean': sum(load) / max(len(load), 1),
            'at_rest': samples[-1][2] if samples else 0, 'samples': samples, **merged}


def simulated(args):
    cluster = Cluster('demo').init().start()
    try:
        cluster.create_role('odoo')
        databases = [f'demo_db{i}' for i in range(1, args.databases + 1)]
        for name in databases:
            cluster.create_database(name)
            cluster.sql('CREATE TABLE demo_order (id serial PRIMARY KEY, customer int, amount float)',
                        dbname=name)
        print(f'PostgreSQL started on 127.0.0.1:{cluster.port}; {args.workers} worker processes, '
              f'{len(databases)} databases, {args.seconds} s of load then {args.rest} s at rest.')
        stock = Settings(idle_timeout=600, wait_timeout=0, max_lifetime=0)
        ours_settings = Settings(idle_timeout=args.idle_timeout)
        budget = args.workers + 4           # the default for these workers and 1 cron worker
        segment = tempfile.mktemp(prefix='dbpool-demo-')
        results = [
            run_arm(cluster, databases, label, make_pool, args.workers, args.seconds, args.rest)
            for label, make_pool in (('stock', ours(stock)), ('per-proc', ours(ours_settings)),
                                     ('shared', ours(ours_settings, (segment, budget))))]
        print()
        print(f'{"policy":<12}{"peak":>6}{"mean":>8}{"at rest":>9}')
        for row in results:
            print(f'{row["arm"]:<12}{row["peak"]:>6}{row["mean"]:>8.1f}{row["at_rest"]:>9}')
        print(f'\nstock keeps idle connections for 600 s; db_pooling closes them after '
              f'db_pool_idle_timeout = {args.idle_timeout:g} s (shortened for the demo, default 60), '
              f'and with the shared budget the {args.workers} workers hold at most {budget} '
              f'connections together (db_pool_max_connections).')
        return 0
    finally:
        cluster.destroy()
        if 'segment' in locals() and os.path.exists(segment):
            os.unlink(segment)


def with_odoo(args, tree):
    from .odoo_runner import OdooServer
    cluster = Cluster('demo').init().start()
    workdir = tempfile.mkdtemp(prefix='dbpool-demo-odoo-')
    os.chmod(workdir, 0o755)
    results = []
    try:
        cluster.create_role('odoo')
        print(f'Odoo {tree.series} at {tree.path}; PostgreSQL on 127.0.0.1:{cluster.port}')
        databases = odoo_databases(tree, cluster, workdir, 'demo_', args.databases)
        for label, pooled in (('stock', False), ('db_pooling', True)):
            server = OdooServer(tree, cluster, workdir, name=label, load_pooling=pooled, options={
                'workers': args.workers, 'db_pool_idle_timeout': args.idle_timeout})
            server.start()
            try:
                results.append(_drive_odoo(server, cluster, databases, label, args))
            finally:
                server.stop()
        print()
        print(f'{"Odoo":<12}{"peak":>6}{"mean":>8}{"at rest":>9}{"requests":>10}{"errors":>8}')
        for row in results:
            print(f'{row["arm"]:<12}{row["peak"]:>6}{row["mean"]:>8.1f}{row["at_rest"]:>9}'
                  f'{row["requests"]:>10}{row["errors"]:>8}')
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def odoo_databases(tree, cluster, workdir, prefix, count):
    """``count`` Odoo databases with ``base`` installed: the first by Odoo, the others
    copied from it. They belong to role odoo as Odoo's own would: Odoo lists only the
    databases its user owns, and seeing a single one it would serve every sessionless
    request on it (monodb), opening a cursor there on top of the request's own."""
    from .odoo_runner import OdooServer
    databases = [f'{prefix}{i}' for i in range(1, count + 1)]
    setup = OdooServer(tree, cluster, workdir, name='setup', load_pooling=False)
    setup.run('-d', databases[0], '-i', 'base', '--stop-after-init')
    for name in databases[1:]:
        cluster.copy_database(name, databases[0], owner='odoo')
    return databases


def _drive_odoo(server, cluster, databases, label, args, count=None, interval=1.0,
                on_measure=None, on_measured=None):
    """``args.clients`` clients (search_read of 20 partners, and a create one time in
    five) on random databases: ``args.warmup`` s unmeasured, then ``args.seconds`` s
    measured and ``args.rest`` s observed after. ``args.load`` (default ``jsonrpc``)
    says how they call: ``jsonrpc`` sessionless ``/jsonrpc`` ``execute_kw`` (login and
    password in every call), ``web`` as the web client does (logged in once per client
    and database, ``/web/dataset/call_kw`` with the session cookie). Connections are
    ``count()`` (default: Odoo's application_name) every ``interval`` s;
    ``on_measure()`` is called when the measured part starts, ``on_measured()`` when
    it ends."""
    count = count or (lambda: cluster.count_connections('odoo-%'))
    web = getattr(args, 'load', 'jsonrpc') == 'web'
    uids = {db: server.login(db) for db in databases}
    sessions = [{db: server.session(db) for db in databases} if web else None
                for _ in range(args.clients)]
    stats = {'latency': [], 'errors': {}, 'calls': [0] * args.clients}

    def call(number, db, method, *call_args, **kwargs):
        stats['calls'][number] += 1         # HTTP requests (a create adds one)
        if web:
            return sessions[number][db].call(
                f'/web/dataset/call_kw/res.partner/{method}', model='res.partner',
                method=method, args=list(call_args), kwargs=kwargs)
        return server.execute(db, uids[db], 'admin', 'res.partner', method, *call_args,
                              **kwargs)

    def client(number, stop_at):
        rng = random.Random(number)
        while time.time() < stop_at:
            db = rng.choice(databases)
            started = time.perf_counter()
            try:
                call(number, db, 'search_read', [], fields=['name'], limit=20)
                if rng.random() < 0.2:
                    call(number, db, 'create', {'name': 'demo'})
                stats['latency'].append(time.perf_counter() - started)
            except Exception as exc:       # noqa: BLE001 - counted
                kind = error_kind(exc)
                stats['errors'][kind] = stats['errors'].get(kind, 0) + 1

    def clients(seconds):
        stop_at = time.time() + seconds
        threads = [threading.Thread(target=client, args=(n, stop_at))
                   for n in range(args.clients)]
        for thread in threads:
            thread.start()
        return threads

    # Warm-up, not measured: every worker loads the registry of every database
    # (about half a second each) before the comparison starts.
    print(f'  {label:<10} warming up for {args.warmup} s (registries load in every worker)',
          flush=True)
    started = time.time()
    for thread in clients(args.warmup):
        thread.join()
    # On a loaded machine the registries take longer: go on until every HTTP worker has
    # logged one per database (at most 3 more warm-up periods).
    wanted = getattr(args, 'workers', 0) * len(databases)
    while (server.log().count('Registry loaded in') < wanted
           and time.time() < started + 4 * args.warmup):
        for thread in clients(2):
            thread.join()
    stats.update(latency=[], errors={}, calls=[0] * args.clients)
    if on_measure:
        on_measure()
    threads = clients(args.seconds)
    samples, start, shown = [], time.time(), 0.0
    stop_at = start + args.seconds
    while time.time() < stop_at + args.rest:
        now = time.time()
        phase = 'load' if now < stop_at else 'rest'
        if phase == 'rest' and on_measured is not None:
            for thread in threads:          # the measured requests have all ended
                thread.join()
            on_measured()
            on_measured = None
        samples.append((now - start, phase, count()))
        if now - shown >= 1.0:
            shown = now
            print(f'  {label:<10} t={now - start:5.1f}s  {phase}  '
                  f'server connections: {samples[-1][2]:3d} {"#" * samples[-1][2]}', flush=True)
        time.sleep(interval)
    for thread in threads:
        thread.join()
    load = [c for _, p, c in samples if p == 'load']
    return {'arm': label, 'peak': max(load or [0]), 'mean': sum(load) / max(len(load), 1),
            'at_rest': samples[-1][2], 'requests': len(stats['latency']),
            'http_requests': sum(stats['calls']),
            'errors': sum(stats['errors'].values()), 'error_kinds': stats['errors'],
            'latency': stats['latency'], 'samples': samples}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='odoo-pool demo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=8, help='worker processes (default 8)')
    parser.add_argument('--databases', type=int, default=6, help='databases (default 6)')
    parser.add_argument('--seconds', type=int, default=10, help='seconds of load per arm')
    parser.add_argument('--rest', type=int, default=8, help='seconds observed after the load')
    parser.add_argument('--idle-timeout', type=float, default=4.0,
                        help='db_pool_idle_timeout for the db_pooling arm (demo: 4 s)')
    parser.add_argument('--clients', type=int, default=16, help='JSON-RPC clients (real Odoo)')
    parser.add_argument('--warmup', type=int, default=20,
                        help='seconds of unmeasured load first (real Odoo)')
    parser.add_argument('--odoo', help='Odoo source tree (default: $ODOO_PATH)')
    parser.add_argument('--simulated', action='store_true', help='ignore ODOO_PATH')
    args = parser.parse_args(argv)
    if not args.simulated:
        from .odoo_runner import available_trees, find_odoo
        if args.odoo:
            return with_odoo(args, find_odoo(args.odoo))
        trees, why_not = available_trees()
        if trees:                   # the newest Odoo found (ODOO_PATH first)
            return with_odoo(args, trees[0] if os.environ.get('ODOO_PATH') else trees[-1])
        print(f'No Odoo found ({why_not}): running the simulated demo.\n')
    return simulated(args)


if __name__ == '__main__':
    sys.exit(main())
