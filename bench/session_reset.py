"""Benchmark of db_pool_reset = smart against always (stock Odoo's reset on every reuse).

Part 1, detection cost: ``session_kinds()`` on a realistic mix of Odoo
statements, median ns per statement, for the fast path (decided without parsing)
and for candidates (confirmed with sqlparse, then cached: first call and cached
call); and ``known_kinds()``, what every ``execute`` of our cursors pays: the same
decision remembered per text, looked up with a new string object each time (Odoo
builds its query text per call); same statistic (least of three medians). A text seen
for the first time pays the check plus an insert (a few hundred ns more).

Part 2, per cursor: what an Odoo cursor does with a pooled connection (borrow,
set_isolation_level, one SELECT, rollback, give back), with smart and always,
on loopback and through a TCP relay adding a delay each way (a LAN or a
cloud database across zones). Reports the client->server sends per cursor
(round trips) and the median latency per cursor.

Run: python bench/session_reset.py [--delay-ms 1] [--cursors 300]
Writes bench/results/session_reset.json.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg2.extensions  # noqa: E402

from odoo_pool_patch.sessions import session_state  # noqa: E402
from odoo_pool_patch.devtools.embedded_pg import Cluster  # noqa: E402
from odoo_pool_patch.config.options import Settings  # noqa: E402
from odoo_pool_patch.pool.connection_pool import ConnectionPool  # noqa: E402

# What Odoo sends most (ORM reads, writes, access checks, sequences, cron locks).
ODOO_MIX = [
    'SELECT "res_partner"."id", "res_partner"."name", "res_partner"."display_name", '
    '"res_partner"."email", "res_partner"."company_id" FROM "res_partner" WHERE '
    '("res_partner"."active" = %s) AND ("res_partner"."company_id" IN %s OR '
    '"res_partner"."company_id" IS NULL) ORDER BY "res_partner"."complete_name", '
    '"res_partner"."id" LIMIT %s',
    'SELECT "res_users"."id" FROM "res_users" WHERE "res_users"."id" IN %s',
    # A web client's search_read: the ORM names every field it fetches.
    'SELECT "res_partner"."id", "res_partner"."name", "res_partner"."complete_name", '
    '"res_partner"."date", "res_partner"."title", "res_partner"."parent_id", '
    '"res_partner"."ref", "res_partner"."lang", "res_partner"."tz", "res_partner"."user_id", '
    '"res_partner"."vat", "res_partner"."website", "res_partner"."comment", '
    '"res_partner"."active", "res_partner"."employee", "res_partner"."function", '
    '"res_partner"."type", "res_partner"."street", "res_partner"."street2", '
    '"res_partner"."zip", "res_partner"."city", "res_partner"."state_id", '
    '"res_partner"."country_id" FROM "res_partner" WHERE ("res_partner"."id" IN %s) '
    'ORDER BY "res_partner"."complete_name" ASC, "res_partner"."id" DESC',
    'INSERT INTO "mail_message" ("author_id", "body", "create_date", "create_uid", '
    '"message_type", "model", "res_id", "write_date", "write_uid") VALUES '
    '(%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING "id"',
    'UPDATE "res_partner" SET "write_date" = %s, "write_uid" = %s WHERE id IN %s',
    'DELETE FROM "bus_bus" WHERE "create_date" < %s',
    '\n            SELECT model, perm_read FROM ir_model_access a JOIN ir_model m ON '
    '(m.id = a.model_id) WHERE m.model = %s AND a.active AND (a.group_id IS NULL OR '
    'a.group_id IN (SELECT gid FROM res_groups_users_rel WHERE uid = %s))',
    "SELECT nextval('ir_sequence_001')",
    'SELECT pg_try_advisory_xact_lock(%s)',
    'WITH RECURSIVE parents AS (SELECT id, parent_id FROM res_partner WHERE id = %s) '
    'SELECT id FROM parents',
    'SAVEPOINT "7f3a2b"',
    'RELEASE SAVEPOINT "7f3a2b"',
    'SELECT "ir_config_parameter"."value" FROM "ir_config_parameter" WHERE "key" = %s',
    "SELECT set_config('odoo.x', %s, true)",
    'SET LOCAL statement_timeout = 5000',
]


def median_ns(function, arg, rounds, number):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(number):
            function(arg)
        samples.append((time.perf_counter_ns() - start) / number)
    return statistics.median(samples)


def _remembered_ns(query, rounds, number):
    """Median over ``rounds`` passes of ns per known_kinds call on ``number`` new string
    objects equal to ``query`` (each hashed afresh, as in the cursor)."""
    samples = []
    for _ in range(rounds):
        fresh = [query[:1] + query[1:] for _ in range(number)]
        start = time.perf_counter_ns()
        for copy in fresh:
            session_state.known_kinds(copy)
        samples.append((time.perf_counter_ns() - start) / number)
    return statistics.median(samples)


def detection(rounds=15, number=2000):
    fast, candidates = [], []
    for query in ODOO_MIX:
        head = session_state._HEAD.match(query).group(1).upper()
        low = query.lower()
        decided_fast = head not in session_state._CANDIDATE_HEADS and not (
            'advisory' in low or 'set_config' in low or ';' in low)
        # Least of three medians: other processes on the machine only ever add time.
        cost = min(median_ns(session_state.session_kinds, query, rounds, number)
                   for _ in range(3))
        (fast if decided_fast else candidates).append(cost)
    remembered = []
    for query in ODOO_MIX:
        session_state.known_kinds(query)       # decided once
        remembered.append(min(_remembered_ns(query, rounds, number) for _ in range(3)))
    session_state.confirm.cache_clear()
    first = []
    for query in ODOO_MIX:
        start = time.perf_counter_ns()
        session_state.confirm(query)
        first.append(time.perf_counter_ns() - start)
    return {'statements': len(ODOO_MIX), 'fast_path_statements': len(fast),
            'fast_path_median_ns': statistics.median(fast),
            'fast_path_max_ns': max(fast),
            'candidate_cached_median_ns': statistics.median(candidates),
            'remembered_median_ns': statistics.median(remembered),
            'candidate_first_parse_median_ns': statistics.median(first),
            'all_median_ns': statistics.median(fast + candidates)}


class DelayRelay:
    """TCP relay 127.0.0.1:port -> target adding ``delay`` seconds each way;
    counts the chunks clients send (one per request: a round trip)."""

    def __init__(self, target, delay):
        self.target, self.delay = target, delay
        self.sends = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, sink, counted):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if counted:
                    self.sends += 1
                if self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def odoo_cursor(pool, info):
    """One Odoo cursor's life on a pooled connection (sql_db.Cursor: borrow,
    cursor, isolation level, a query, rollback on close, give back)."""
    cnx = pool.borrow(info)
    cur = cnx.cursor()
    cnx.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    cur.execute('SELECT "res_users"."id" FROM (SELECT 1 AS id) AS "res_users" WHERE id = %s', (1,))
    cur.fetchall()
    cur.close()
    cnx.rollback()
    pool.give_back(cnx)


def per_cursor(relay, cursors, rounds=10):
    """Both modes side by side, in alternating batches (the machine's load
    drifts): round trips and median latency per cursor for each."""
    pools, sends, times = {}, {}, {}
    info = {'database': 'postgres', 'host': '127.0.0.1', 'port': relay.port, 'user': 'postgres',
            'application_name': 'bench-reset', 'sslmode': 'disable'}
    try:
        for mode in MODES:
            pools[mode] = ConnectionPool(4, settings=Settings(reset=mode, check_after=0))
            sends[mode], times[mode] = 0, []
            for _ in range(20):
                odoo_cursor(pools[mode], info)      # warm: connection open, caches
        batch = max(cursors // rounds, 1)
        for _ in range(rounds):
            for mode in MODES:
                before = relay.sends
                for _ in range(batch):
                    start = time.perf_counter()
                    odoo_cursor(pools[mode], info)
                    times[mode].append((time.perf_counter() - start) * 1e3)
                sends[mode] += relay.sends - before
        return {mode: {'round_trips': sends[mode] / len(times[mode]),
                       'median_ms': statistics.median(times[mode]),
                       'stats': {k: v for k, v in pools[mode].stats.as_dict().items()
                                 if k.startswith('reset_') and v}} for mode in MODES}
    finally:
        for pool in pools.values():
            pool.shutdown()


MODES = ('always', 'smart')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--delay-ms', type=float, default=1.0, help='added delay each way')
    parser.add_argument('--cursors', type=int, default=500)
    args = parser.parse_args()
    results = {'detection': detection(), 'per_cursor': {}}
    det = results['detection']
    print(f"Detection on {det['statements']} Odoo statements "
          f"({det['fast_path_statements']} decided by the fast path):")
    print(f"  fast path           median {det['fast_path_median_ns']:8.0f} ns  "
          f"(max {det['fast_path_max_ns']:.0f} ns)")
    print(f"  candidate (cached)  median {det['candidate_cached_median_ns']:8.0f} ns")
    print(f"  remembered per text median {det['remembered_median_ns']:7.0f} ns  "
          f"(known_kinds: what a cursor's execute pays)")
    print(f"  candidate (parsed)  median {det['candidate_first_parse_median_ns']:8.0f} ns  "
          f"(first time a text is seen)")
    cluster = Cluster('bench-reset').init().start()
    try:
        print(f"\nPer Odoo cursor (borrow, isolation level, SELECT, rollback, give back), "
              f"{args.cursors} cursors:")
        print(f"  {'link':<22}{'mode':<8}{'round trips':>12}{'median ms':>11}")
        for label, delay in (('loopback', 0.0), (f'+{args.delay_ms:g} ms each way',
                                                  args.delay_ms / 1e3)):
            relay = DelayRelay((cluster.host, cluster.port), delay)
            row = results['per_cursor'][label] = per_cursor(relay, args.cursors)
            for mode in MODES:
                print(f"  {label:<22}{mode:<8}{row[mode]['round_trips']:>12.2f}"
                      f"{row[mode]['median_ms']:>11.3f}")
            row['saved_round_trips'] = row['always']['round_trips'] - row['smart']['round_trips']
            row['saved_ms'] = row['always']['median_ms'] - row['smart']['median_ms']
            print(f"  {'':<22}{'saved':<8}{row['saved_round_trips']:>12.2f}{row['saved_ms']:>11.3f}")
            relay.close()
    finally:
        cluster.destroy()
    os.makedirs(os.path.join(ROOT, 'bench', 'results'), exist_ok=True)
    path = os.path.join(ROOT, 'bench', 'results', 'session_reset.json')
    with open(path, 'w') as handle:
        json.dump(results, handle, indent=2)
    print(f'\nwrote {os.path.relpath(path, ROOT)}')


if __name__ == '__main__':
    main()
