"""Chaos benchmark: real Odoo through worker kills, backend kills, restarts and outages,
with an integrity audit, side by side in one run.

Arms (same PostgreSQL, same databases, same load and faults; one Odoo server each, in turn,
interleaved over --rounds):
  stock       stock Odoo, its own pool in every worker
  db_pooling  Odoo with db_pooling loaded server-wide, its defaults
  pgbouncer   stock Odoo through PgBouncer in transaction mode (its defaults; no replica)

Load: --clients threads on --databases databases of a prefork server (--workers HTTP workers
+ 1 cron), each logged in to every database as the web client is. Each writes a record with
a unique name (``/web/dataset/call_kw`` ``create``), then reads it back in another request
(``search_read``: on Odoo 18+ a read-only route, served by the replica when there is one).
A write is *acknowledged* when its response came back.

Phases, in order. A failed request counts in the phase it failed in; for a server stop
or restart, in that phase when it began before the server was back (it was in flight or
waited through the outage), in the after- phase when it began after:
  calm          nothing happens
  worker-kill   an HTTP worker SIGKILLed every second
  backend-kill  an Odoo backend terminated (pg_terminate_backend) every 0.5 s
  restart       PostgreSQL restarted (pg_ctl restart -m fast, about a second)
  after-restart the 5 s after it is back
  replica       the replica stopped for 5 s (arms that have one)
  after-replica the 5 s after it is back
  primary       the primary stopped for 5 s
  after-primary the 5 s after it is back

Audit, at the end of every arm, in every database: each acknowledged record exactly once
(``lost``: missing, ``dup``: more than once) and in its own database (``misplaced``);
``wrong reads``: a read-back that returned another record; ``stale reads``: one that found
nothing yet (a replica behind the session's own write: stock Odoo reads from the replica
whatever the session just wrote, db_pooling waits for it or reads from the primary).

Run: python bench/chaos.py   (Odoo from ODOO_PATH, else the newest /opt/odoo tree)
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import odoo_tree, print_table, write_json  # noqa: E402
from odoo_pool_patch.devtools.demo import error_kind, odoo_databases  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer  # noqa: E402
from odoo_pool_patch.devtools.odoo_runner import OdooServer  # noqa: E402

import psycopg2  # noqa: E402

ARMS = ('stock', 'db_pooling', 'pgbouncer')
PHASES = ('calm', 'worker-kill', 'backend-kill', 'restart', 'after-restart', 'replica',
          'after-replica', 'primary', 'after-primary')
COLUMNS = [('arm', 'arm', ''), ('requests', 'requests', 'd'), ('errors', 'errors', 'd'),
           *[(phase, phase, 'd') for phase in PHASES],
           ('lost', 'lost', 'd'), ('dup', 'dup', 'd'), ('misplaced', 'misplaced', 'd'),
           ('wrong_reads', 'wrong reads', 'd'), ('stale_reads', 'stale reads', 'd'),
           ('peak', 'peak cnx', 'd')]


class Sampler:
    """Peak of the server connections of role odoo, sampled every 0.2 s through a
    connection of its own that it reopens after a restart."""

    def __init__(self, cluster):
        self.cluster, self.peak, self.cnx = cluster, 0, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.2):
            try:
                if self.cnx is None or self.cnx.closed:
                    self.cnx = self.cluster.connect('postgres',
                                                    application_name='dbpool-chaos-sampler')
                with self.cnx.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'odoo' "
                                "AND backend_type = 'client backend'")
                    self.peak = max(self.peak, cur.fetchone()[0])
            except psycopg2.Error:
                self.cnx = None

    def close(self):
        self.stop.set()
        self.thread.join(5)
        if self.cnx is not None and not self.cnx.closed:
            self.cnx.close()


def http_workers(server):
    """Pids of the prefork server's HTTP (and cron) workers; the gevent process excluded."""
    master = server.proc.pid
    try:
        with open(f'/proc/{master}/task/{master}/children') as handle:
            children = [int(pid) for pid in handle.read().split()]
    except OSError:
        return []
    workers = []
    for pid in children:
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as handle:
                if b'gevent' not in handle.read():
                    workers.append(pid)
        except OSError:
            pass
    return workers


def terminate_one(cluster):
    try:
        cnx = cluster.connect('postgres', application_name='dbpool-chaos-killer')
    except psycopg2.Error:
        return
    try:
        with cnx.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = 'odoo' AND backend_type = 'client backend' "
                        "AND pid <> pg_backend_pid() ORDER BY random() LIMIT 1")
    except psycopg2.Error:
        pass
    finally:
        cnx.close()


class Load:
    """The clients, each logged in to every database as the web client is: write a
    unique record (``call_kw create``), read it back in another request (``call_kw
    search_read``). A session Odoo dropped (it could not reach the database) logs in
    again, as a user would."""

    def __init__(self, server, databases, label, clients):
        self.server, self.databases, self.label = server, databases, label
        self.sessions = [{db: server.session(db) for db in databases} for _ in range(clients)]
        self.acked, self.requests, self.errors = [], [], []   # (started, failed, kind)
        self.stale_reads = self.wrong_reads = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True)
                        for n in range(clients)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(180)

    def _call(self, number, db, what, method, *args, **kwargs):
        started = time.time()
        self.requests.append(started)
        try:
            return self.sessions[number][db].call(
                f'/web/dataset/call_kw/res.partner/{method}', model='res.partner',
                method=method, args=list(args), kwargs=kwargs)
        except Exception as exc:                # noqa: BLE001 - counted
            self.errors.append((started, time.time(), f'{what} {error_kind(exc)}'))
            if getattr(exc, 'code', None) == 404:       # the session lost its database
                try:
                    self.sessions[number][db] = self.server.session(db)
                except Exception:               # noqa: BLE001 - next time
                    pass
            raise

    def _client(self, number):
        rng = random.Random(number)
        sequence = 0
        while not self.stop.is_set():
            db = rng.choice(self.databases)
            name = f'chaos-{self.label}-{number}-{sequence}'
            sequence += 1
            try:
                record = self._call(number, db, 'write', 'create', {'name': name})
            except Exception:                   # noqa: BLE001 - counted
                continue
            if isinstance(record, list):
                record = record[0]
            self.acked.append((db, name, record))
            try:
                rows = self._call(number, db, 'read', 'search_read', [['name', '=', name]],
                                  fields=['id'])
            except Exception:                   # noqa: BLE001 - counted
                continue
            if not rows:
                self.stale_reads += 1           # a replica that has not replayed it yet
            elif [row['id'] for row in rows] != [record]:
                self.wrong_reads += 1


def audit(cluster, databases, label, acked):
    """(lost, duplicated, misplaced) acknowledged records."""
    found = {}
    for db in databases:
        cnx = cluster.connect(db)
        try:
            with cnx.cursor() as cur:
                cur.execute("SELECT name, count(*) FROM res_partner WHERE name LIKE %s "
                            "GROUP BY name", (f'chaos-{label}-%',))
                for name, count in cur.fetchall():
                    found.setdefault(name, {})[db] = count
        finally:
            cnx.close()
    lost = sum(1 for db, name, _ in acked if name not in found)
    duplicated = sum(1 for _, name, _ in acked if sum(found.get(name, {}).values()) > 1)
    misplaced = sum(1 for db, name, _ in acked if name in found and db not in found[name])
    return lost, duplicated, misplaced


def run_arm(tree, cluster, replica, workdir, databases, arm, args, number):
    label = f'{arm}{number}'
    options = {'workers': args.workers, 'max_cron_threads': 1}
    bouncer = None
    if arm == 'pgbouncer':
        bouncer = PgBouncer(cluster).start()
        options.update(db_host=bouncer.host, db_port=bouncer.port)
    elif replica is not None:
        options.update(db_replica_host=replica.host, db_replica_port=replica.port)
    server = OdooServer(tree, cluster, workdir, name=label, options=options,
                        load_pooling=arm == 'db_pooling')
    sampler = None
    phases = []
    try:
        server.start()
        load = Load(server, databases, label, args.clients)
        print(f'  {label}: warming up {args.warmup} s', flush=True)
        load.start()
        time.sleep(args.warmup)
        sampler = Sampler(cluster)
        measured_from = time.time()

        def phase(name, seconds, every=None, action=None):
            began = time.time()
            while time.time() < began + seconds:
                if action is not None:
                    action()
                time.sleep(every or seconds)
            phases.append((name, began, time.time()))

        phase('calm', args.phase)
        phase('worker-kill', args.phase, 1.0, lambda: _kill_one(http_workers(server)))
        phase('backend-kill', args.phase, 0.5, lambda: terminate_one(cluster))
        phases.append(('restart', time.time(), None))
        cluster.restart('fast')
        phases[-1] = ('restart', phases[-1][1], time.time())
        phase('after-restart', args.after)
        for name, stopped in (('replica', replica if arm != 'pgbouncer' else None),
                              ('primary', cluster)):
            if stopped is None:
                continue
            began = time.time()
            stopped.stop()
            time.sleep(args.outage)
            stopped.start()
            phases.append((name, began, time.time()))
            phase('after-' + name, args.after)
        load.finish()
        sampler.close()
        lost, duplicated, misplaced = audit(cluster, databases, label, load.acked)
    finally:
        if sampler is not None:
            sampler.close()
        server.stop()
        if bouncer:
            bouncer.destroy()
    row = {'arm': arm, 'requests': sum(1 for t in load.requests if t >= measured_from),
           'errors': sum(1 for _, t, _ in load.errors if t >= measured_from),
           'lost': lost, 'dup': duplicated, 'misplaced': misplaced,
           'stale_reads': load.stale_reads, 'wrong_reads': load.wrong_reads,
           'peak': sampler.peak, 'kinds': {}}
    row['late'] = []        # what began once a server was back and failed: none, ideally
    for name, began, ended in phases:
        if name in ('restart', 'replica', 'primary'):
            failed = [kind for start, end, kind in load.errors if start < ended and end >= began]
        elif name.startswith('after-'):     # began after the server was back, failed before
            failed = [kind for start, end, kind in load.errors   # the next phase began
                      if began <= start and end < ended]
            row['late'] += [f'{name}: {kind}' for kind in failed]
        else:
            failed = [kind for _, end, kind in load.errors if began <= end < ended]
        row[name] = len(failed)
    for name in PHASES:
        row.setdefault(name, None)
    for _, failed_at, kind in load.errors:
        if failed_at >= measured_from:
            row['kinds'][kind] = row['kinds'].get(kind, 0) + 1
    return row


def _kill_one(pids):
    if pids:
        try:
            os.kill(random.choice(pids), signal.SIGKILL)
        except OSError:
            pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=8)
    parser.add_argument('--databases', type=int, default=6)
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--warmup', type=float, default=20)
    parser.add_argument('--phase', type=float, default=8, help='seconds of calm and kill phases')
    parser.add_argument('--outage', type=float, default=5, help='seconds a server stays down')
    parser.add_argument('--after', type=float, default=5, help='seconds watched after each')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--no-replica', action='store_true')
    parser.add_argument('--odoo', help='Odoo source tree (default: ODOO_PATH, else newest)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    tree, why_not = odoo_tree(args.odoo)
    if tree is None:
        print(f'n/a: {why_not}')
        return 0
    arms = [a for a in args.arms.split(',') if a]
    cluster = Cluster('chaos').init().start()
    replica = None
    workdir = tempfile.mkdtemp(prefix='dbpool-chaos-')
    os.chmod(workdir, 0o755)
    rows = []
    try:
        cluster.create_role('odoo')
        databases = odoo_databases(tree, cluster, workdir, 'chaos_', args.databases)
        if not args.no_replica and tree.major >= 18:
            replica = cluster.make_replica('chaos-replica')
        print(f'Odoo {tree.series}, {args.workers} workers + 1 cron, {len(databases)} databases, '
              f'{args.clients} clients, replica: {"yes" if replica else "no"}', flush=True)
        for number in range(args.rounds):
            order = arms[number % len(arms):] + arms[:number % len(arms)]
            for arm in order:
                rows.append(run_arm(tree, cluster, replica, workdir, databases, arm, args,
                                    number))
                print(f'  {arm}: {rows[-1]}', flush=True)
    finally:
        if replica is not None:
            replica.destroy()
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(COLUMNS, rows)
    write_json('chaos', {'odoo': tree.series, 'args': vars(args), 'rows': rows}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
