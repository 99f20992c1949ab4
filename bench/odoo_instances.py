"""Several Odoo instances on one PostgreSQL server: one budget for all of them, side by side
in one run.

The case of the public PgBouncer case study: a host runs several Odoo instances (containers)
against one PostgreSQL. Here --instances prefork servers (--workers HTTP workers and 1 cron
worker each), each serving its own --databases databases, under the web client's load.

Arms (same PostgreSQL, same databases, same load; the instances of an arm run together):
  stock       stock Odoo, every worker its own pool
  pgbouncer   stock Odoo, the instances through one PgBouncer in transaction mode
              (server_idle_timeout = --idle-timeout)
  db_pooling  db_pooling in every instance, one budget for all of them: the same
              db_pool_shared_path and db_pool_max_connections = --budget (default: the sum of
              the instances' default budgets, workers + 3 x cron + 1 each), idle timeout
              --idle-timeout. Idle connections move between the instances' processes too
              (the exchange: same host, same user); each instance parks in its own queues.

The load: --clients threads, client n on instance n mod --instances, each logged in once
to every database of its instance as the web client is (before the first arm; the
sessions live in each instance's data directory, which every arm reuses), calling
/web/dataset/call_kw on a random one: a search_read of 20 partners, and a create one
time in five. --warmup s unmeasured, longer until every HTTP worker loaded every registry
of its instance, --seconds s measured, --rest s observed after. Figures: server connections of role odoo (peak and mean
under load, at rest), requests (a search_read and its create, if any, count as one),
throughput, p50/p99, errors, and CPU per HTTP request of the Odoo processes and of all
(PostgreSQL's backends and PgBouncer included). --rounds N interleaves the arms N times and
reports every round and the medians.

Run: python bench/odoo_instances.py   (Odoo from ODOO_PATH, else the newest /opt/odoo tree)
"""
import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (CpuMeter, ServerCounters, interleaved, latency_figures,  # noqa: E402
                           odoo_tree, postmaster_pid, report_rounds, write_json)
from odoo_pool_patch.devtools.demo import error_kind, odoo_databases  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer  # noqa: E402
from odoo_pool_patch.devtools.odoo_runner import OdooServer  # noqa: E402

ARMS = ('stock', 'db_pooling', 'pgbouncer')
COLUMNS = [('arm', 'arm', ''), ('peak', 'peak', 'd'), ('mean', 'mean', '.1f'),
           ('at_rest', 'at rest', 'd'), ('requests', 'requests', 'd'), ('per_s', 'req/s', '.1f'),
           ('p50_ms', 'p50 ms', '.1f'), ('p99_ms', 'p99 ms', '.1f'), ('errors', 'errors', 'd'),
           ('odoo_cpu_us', 'Odoo CPU µs/req', '.0f'), ('cpu_us', 'all CPU µs/req', '.0f')]


class Load:
    """The clients: client n on instance n mod instances, a web session per database of
    it. The sessions outlive the servers of an arm (their files are in the instance's
    data directory): :meth:`serve` points them at the next arm's servers."""

    def __init__(self, databases, clients):
        self.databases = databases
        self.clients = clients
        self.sessions = None
        self.reset()

    def serve(self, servers):
        if self.sessions is None:       # log in once, in parallel (password hashing)
            self.sessions = [None] * self.clients

            def logged_in(server, db):
                for attempt in range(10):   # logins of one user at once: serialization
                    try:                    # failures on res_users
                        return server.session(db)
                    except Exception:       # noqa: BLE001 - again, a bit later
                        if attempt == 9:
                            raise
                        time.sleep(random.random())

            def login(number):
                index = number % len(servers)
                self.sessions[number] = {db: logged_in(servers[index], db)
                                         for db in self.databases[index]}
            threads = [threading.Thread(target=login, args=(n,)) for n in range(self.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for number, sessions in enumerate(self.sessions):
            for session in sessions.values():
                session.server = servers[number % len(servers)]

    def reset(self):
        self.latency, self.errors, self.calls = [], {}, [0] * self.clients

    def _call(self, number, db, method, *args, **kwargs):
        self.calls[number] += 1
        return self.sessions[number][db].call(
            f'/web/dataset/call_kw/res.partner/{method}', model='res.partner',
            method=method, args=list(args), kwargs=kwargs)

    def _client(self, number, stop_at):
        rng = random.Random(number)
        databases = list(self.sessions[number])
        while time.time() < stop_at:
            db = rng.choice(databases)
            started = time.perf_counter()
            try:
                self._call(number, db, 'search_read', [], fields=['name'], limit=20)
                if rng.random() < 0.2:
                    self._call(number, db, 'create', {'name': 'bench'})
                self.latency.append(time.perf_counter() - started)
            except Exception as exc:           # noqa: BLE001 - counted
                kind = error_kind(exc)
                self.errors[kind] = self.errors.get(kind, 0) + 1

    def run(self, seconds):
        """Threads running for ``seconds`` (joined by the caller)."""
        stop_at = time.time() + seconds
        threads = [threading.Thread(target=self._client, args=(n, stop_at), daemon=True)
                   for n in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads


def run_arm(tree, cluster, workdir, databases, arm, args, counters, number, load):
    pooled = arm == 'db_pooling'
    bouncer = None
    options = {'workers': args.workers, 'max_cron_threads': 1}
    if arm == 'pgbouncer':
        bouncer = PgBouncer(cluster, settings={
            'server_idle_timeout': max(1, round(args.idle_timeout))}).start()
        options.update(db_host=bouncer.host, db_port=bouncer.port)
    if pooled:
        options.update(db_pool_idle_timeout=args.idle_timeout,
                       db_pool_max_connections=args.budget,
                       db_pool_shared_path=os.path.join(workdir, f'shared-{number}'))
    servers = []
    try:
        for index, dbs in enumerate(databases):
            # db_name: each instance serves its own databases (its cron worker too);
            # data_dir: the instance's, whatever the arm (its web sessions stay valid)
            server = OdooServer(tree, cluster, workdir, name=f'{arm}-{number}-i{index}',
                                options=dict(options, db_name=','.join(dbs),
                                             data_dir=os.path.join(workdir, f'inst{index}-data')),
                                load_pooling=pooled)
            if pooled:      # the one budget's file (OdooServer sets one per server)
                server.options['db_pool_shared_path'] = options['db_pool_shared_path']
            servers.append(server.start())
        load.serve(servers)
        print(f'  {arm:<10} warming up for {args.warmup} s (registries)', flush=True)
        started = time.time()
        for thread in load.run(args.warmup):
            thread.join()
        wanted = args.workers * args.databases      # every HTTP worker, every registry
        while (min(server.log().count('Registry loaded in') for server in servers) < wanted
               and time.time() < started + 4 * args.warmup):
            for thread in load.run(2):
                thread.join()
        load.reset()
        groups = [server.proc.pid for server in servers]
        meters = {'odoo': CpuMeter(groups=groups).start(),
                  'all': CpuMeter(groups=groups, parents=[postmaster_pid(cluster)],
                                  pids=[bouncer.pid()] if bouncer else []).start()}
        threads = load.run(args.seconds)
        samples, start, used = [], time.time(), None
        stop_at = start + args.seconds
        while time.time() < stop_at + args.rest:
            now = time.time()
            phase = 'load' if now < stop_at else 'rest'
            if phase == 'rest' and used is None:
                for thread in threads:
                    thread.join()
                used = {name: meter.stop() for name, meter in meters.items()}
            samples.append((phase, counters.connections()))
            time.sleep(0.25)
        in_load = [n for phase, n in samples if phase == 'load']
        calls = max(sum(load.calls), 1)
        row = {'arm': arm, 'peak': max(in_load or [0]), 'mean': sum(in_load) / max(len(in_load), 1),
               'at_rest': samples[-1][1], 'requests': len(load.latency),
               'http_requests': sum(load.calls), 'errors': sum(load.errors.values()),
               'error_kinds': load.errors,
               'odoo_cpu_us': 1e6 * used['odoo'] / calls, 'cpu_us': 1e6 * used['all'] / calls}
        row.update(latency_figures(load.latency, args.seconds))
        print(f'  {arm:<10} peak {row["peak"]}, at rest {row["at_rest"]}, '
              f'{row["per_s"]:.1f} req/s, p99 {row["p99_ms"]:.0f} ms', flush=True)
        return row
    finally:
        for server in servers:
            server.stop()
        if bouncer:
            bouncer.destroy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--instances', type=int, default=3)
    parser.add_argument('--workers', type=int, default=4, help='HTTP workers per instance')
    parser.add_argument('--databases', type=int, default=6, help='databases per instance')
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--budget', type=int, default=None,
                        help='db_pool_max_connections of the one budget (default: the sum of '
                             'the instances\' defaults, workers + 3 x 1 cron + 1 each)')
    parser.add_argument('--seconds', type=int, default=20, help='measured load per arm')
    parser.add_argument('--warmup', type=int, default=15, help='unmeasured load first')
    parser.add_argument('--idle-timeout', type=float, default=3.0)
    parser.add_argument('--rest', type=float, default=None,
                        help='seconds observed after the load (default 2 idle timeouts + 1.5)')
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--odoo', help='Odoo source tree (default: ODOO_PATH, else newest /opt/odoo)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    args.rest = args.rest if args.rest is not None else 2 * args.idle_timeout + 1.5
    args.budget = args.budget or args.instances * (args.workers + 3 + 1)
    tree, why_not = odoo_tree(args.odoo)
    if tree is None:
        print(f'n/a: {why_not}')
        return 0
    arms = [a for a in args.arms.split(',') if a]
    # (stock: every worker its own pool for each database of its instance)
    cluster = Cluster('bench-instances', settings={'max_connections': 300}).init().start()
    workdir = tempfile.mkdtemp(prefix='dbpool-bench-instances-')
    os.chmod(workdir, 0o755)
    try:
        cluster.create_role('odoo')
        first = odoo_databases(tree, cluster, workdir, 'inst0_', args.databases)
        databases = [first]
        for index in range(1, args.instances):
            names = [f'inst{index}_{n}' for n in range(1, args.databases + 1)]
            for name in names:
                cluster.sql(f'CREATE DATABASE "{name}" TEMPLATE "{first[0]}" OWNER odoo')
            databases.append(names)
        counters = ServerCounters(cluster)
        load = Load(databases, args.clients)
        print(f'Odoo {tree.series}: {args.instances} instances of {args.workers} workers + 1 cron, '
              f'{args.databases} databases each, {args.clients} clients (web sessions), '
              f'db_pooling budget {args.budget}; {args.seconds} s measured after '
              f'{args.warmup} s warm-up', flush=True)
        results = interleaved(arms, args.rounds, lambda arm, number: run_arm(
            tree, cluster, workdir, databases, arm, args, counters, number, load))
        counters.close()
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = report_rounds(COLUMNS, results, args.rounds)
    write_json('odoo_instances', {'odoo': tree.series, 'args': vars(args), 'rows': rows},
               args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
