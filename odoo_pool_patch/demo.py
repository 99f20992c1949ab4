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
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

from .embedded_pg import Cluster
from .options import Settings
from .pool import ConnectionPool

APP = 'odoo-demo'


def _worker(cluster_dsn, databases, settings, maxconn, stop_at, seed, budget_spec):
    """Body of one forked worker process: serve requests until ``stop_at``."""
    random.seed(seed)
    budget = None
    if budget_spec:                 # (shared state path, budget size)
        from .budget import SharedBudget
        from .shared_state import SharedState
        budget = SharedBudget(SharedState(budget_spec[0]), budget_spec[1], min_idle=1,
                              role='http')
    pool = ConnectionPool(maxconn, settings=settings, budget=budget)
    served = errors = 0
    while time.time() < stop_at:
        db = random.choice(databases)
        try:
            cnx = pool.borrow(dict(cluster_dsn, database=db))
            with cnx.cursor() as cur:
                for _ in range(12):
                    cur.execute('SELECT count(*), max(amount) FROM demo_order WHERE customer = %s',
                                [random.randint(1, 50)])
                    cur.fetchall()
                for _ in range(2):
                    cur.execute('INSERT INTO demo_order (customer, amount) VALUES (%s, %s)',
                                [random.randint(1, 50), random.random() * 100])
            cnx.commit()
            pool.give_back(cnx)
            served += 1
        except Exception:           # noqa: BLE001 - counted, the demo goes on
            errors += 1
        time.sleep(random.uniform(0.005, 0.03))   # think time between requests
    # Like an idle Odoo worker: it stays alive and keeps its pool until told to stop.
    signal.sigwait({signal.SIGTERM})
    os._exit(0 if not errors else 3)


def run_arm(cluster, databases, label, settings, workers, seconds, rest, maxconn=64,
            budget_spec=None):
    """Fork ``workers`` processes for ``seconds`` of load; sample connections during
    the load and for ``rest`` seconds after it."""
    dsn = {'host': cluster.host, 'port': cluster.port, 'user': 'odoo',
           'application_name': f'{APP}-{label}'}
    stop_at = time.time() + seconds
    pids = []
    for number in range(workers):
        pid = os.fork()
        if pid == 0:                # pragma: no cover - child
            try:
                _worker(dsn, databases, settings, maxconn, stop_at, number, budget_spec)
            finally:
                os._exit(1)
        pids.append(pid)
    samples, start = [], time.time()
    try:
        while time.time() < stop_at + rest:
            count = cluster.count_connections(f'{APP}-{label}')
            phase = 'load' if time.time() < stop_at else 'rest'
            samples.append((time.time() - start, phase, count))
            print(f'  {label:<10} t={time.time() - start:5.1f}s  {phase}  '
                  f'server connections: {count:3d} {"#" * count}', flush=True)
            time.sleep(1.0)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
    load = [c for _, p, c in samples if p == 'load']
    return {'arm': label, 'peak': max(load or [0]), 'mean': sum(load) / max(len(load), 1),
            'at_rest': samples[-1][2] if samples else 0}


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
        ours = Settings(idle_timeout=args.idle_timeout)
        budget = args.workers + 4           # the default for these workers and 1 cron worker
        segment = tempfile.mktemp(prefix='dbpool-demo-')
        results = [
            run_arm(cluster, databases, 'stock', stock, args.workers, args.seconds, args.rest),
            run_arm(cluster, databases, 'per-proc', ours, args.workers, args.seconds, args.rest),
            run_arm(cluster, databases, 'shared', ours, args.workers, args.seconds, args.rest,
                    budget_spec=(segment, budget)),
        ]
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
        databases = [f'demo_{i}' for i in range(1, args.databases + 1)]
        setup = OdooServer(tree, cluster, workdir, name='setup', load_pooling=False)
        setup.run('-d', databases[0], '-i', 'base', '--stop-after-init')
        for name in databases[1:]:
            cluster.sql(f'CREATE DATABASE "{name}" TEMPLATE "{databases[0]}"')
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


def _drive_odoo(server, cluster, databases, label, args):
    uids = {db: server.login(db) for db in databases}
    counts = {'requests': 0, 'errors': 0}
    # Warm-up, not measured: every worker loads the registry of every database
    # (about half a second each) before the comparison starts.
    print(f'  {label:<10} warming up for {args.warmup} s (registries load in every worker)',
          flush=True)
    stop_at = time.time() + args.warmup
    warm = [threading.Thread(target=lambda: client()) for _ in range(args.clients)]

    def client():
        while time.time() < stop_at:
            db = random.choice(databases)
            try:
                server.execute(db, uids[db], 'admin', 'res.partner', 'search_read',
                               [], fields=['name'], limit=20)
                if random.random() < 0.2:
                    server.execute(db, uids[db], 'admin', 'res.partner', 'create',
                                   {'name': 'demo'})
                counts['requests'] += 1
            except Exception:       # noqa: BLE001 - counted
                counts['errors'] += 1

    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    counts.update(requests=0, errors=0)
    stop_at = time.time() + args.seconds
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    samples, start = [], time.time()
    while time.time() < stop_at + args.rest:
        count = cluster.count_connections('odoo-%')
        phase = 'load' if time.time() < stop_at else 'rest'
        samples.append((phase, count))
        print(f'  {label:<10} t={time.time() - start:5.1f}s  {phase}  '
              f'server connections: {count:3d} {"#" * count}', flush=True)
        time.sleep(1.0)
    for thread in threads:
        thread.join()
    load = [c for p, c in samples if p == 'load']
    return {'arm': label, 'peak': max(load or [0]), 'mean': sum(load) / max(len(load), 1),
            'at_rest': samples[-1][1], **counts}


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
