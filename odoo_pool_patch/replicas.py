"""Read-only routing: the primary plus the replicas of ``db_replicas``, chosen per borrow.

A read-only pool (Odoo 18+'s ``_Pool_readonly``, or the 16/17 one of
:mod:`.replica_routes`) gets a :class:`Router`. On every borrow the router
picks a usable replica by weight and rewrites the host/port of the DSN; the
``postgres`` database, URI DSNs and every read when no replica is usable go
to the primary (the cursor still has a read-only session). A replica that
refuses the connection is banned (shared with every process) and the borrow
moves on to the next choice, so the caller never sees the failure.

Whether a replica is usable (banned, lagging, behind this session's last
write) is read from the shared rows kept by :mod:`.replica_health`; counters
are kept per process and added to the shared rows by the health thread.
"""
import os
import random
import threading

import psycopg2

from .errors import ConfigError

BANNED, LAGGING, PINNED, WRITE = range(4)
REASONS = ('banned', 'lagging', 'pinned', 'write')


class Target:
    """One server: index 0 is the primary, then the replicas in configuration order."""
    __slots__ = ('index', 'host', 'port', 'weight', 'kind')

    def __init__(self, index, host, port, weight=1, kind='replica'):
        self.index, self.host, self.port, self.weight, self.kind = index, host, port, weight, kind

    @property
    def name(self):
        return f"{self.host or 'local socket'}:{self.port}"

    def __repr__(self):
        return f'<{self.kind} {self.name} weight {self.weight}>'


def parse_replicas(value):
    """``host:port[:weight], ...`` (IPv6 as ``[addr]:port``) -> ((host, port, weight), ...)."""
    entries = []
    for item in str(value).split(','):
        item = item.strip()
        if not item:
            continue
        if item.startswith('['):
            host, _, rest = item[1:].partition(']')
            parts = [host] + (rest[1:].split(':') if rest.startswith(':') else [])
        else:
            parts = item.split(':')
        if not parts[0] or len(parts) > 3:
            raise ValueError(item)
        port = int(parts[1]) if len(parts) > 1 else 5432
        weight = int(parts[2]) if len(parts) > 2 else 1
        if not 0 < port < 65536 or weight < 0:
            raise ValueError(item)
        entries.append((parts[0], port, weight))
    return tuple(entries)


def _set(value):
    return value not in (None, False, '', 'False', 'None')


def targets_from_config(settings, get):
    """[primary, replica, ...] from db_host/db_port and db_replicas, or else the stock
    db_replica_host/db_replica_port as a one-replica list.

    An empty ``db_replica_host`` (Odoo 18's "replica on the local socket" for
    testing) and 19's ``dev_mode = replica`` give no replica: read-only cursors
    are then served by the primary with a read-only session, as stock intends."""
    port = int(get('db_port') or 5432)
    primary = Target(0, get('db_host') if _set(get('db_host')) else None, port, 0, 'primary')
    replicas = list(settings.replicas)
    if not replicas and _set(get('db_replica_host')):
        try:
            replica_port = int(get('db_replica_port') or port)
        except ValueError:
            raise ConfigError(f"db_replica_port = {get('db_replica_port')!r} is not a port "
                              f"number: fix it in odoo.conf") from None
        replicas = [(get('db_replica_host'), replica_port, 1)]
    return [primary] + [Target(i, host, p, w) for i, (host, p, w) in enumerate(replicas, 1)]


class Router:
    """Choice of a server per borrow, for the pools of one process.

    :param targets: from :func:`targets_from_config` (primary first).
    :param table: the shared rows (:class:`.replica_health.ServerTable`).
    :param required_lsn: callable -> WAL position (int) this session's reads
        must see, or None (read-your-writes; Odoo: from the HTTP session).
    """

    def __init__(self, targets, table, settings, required_lsn=None):
        self.targets = targets
        self.primary = targets[0]
        self.replicas = [t for t in targets[1:] if t.weight > 0]
        self.table = table
        self.max_lag_ms = int(settings.replica_max_lag * 1000)
        self.ban_time = settings.replica_ban_time
        self.read_your_writes = settings.replica_read_your_writes
        self.required_lsn = required_lsn or (lambda: None)
        self.monitor = None         # replica_health.Monitor, set by start_routing
        self._local = threading.local()
        self._counts_lock = threading.Lock()
        self._reset_counts()

    def _reset_counts(self):
        n = len(self.targets)
        self.reads, self.writes = [0] * n, [0] * n
        self.fallbacks = [[0] * len(REASONS) for _ in range(n)]

    # ------------------------------------------------------------------ choice
    def choose(self, connection_info, exclude=()):
        """(target, reason the primary serves it or None) for a read-only borrow."""
        if 'dsn' in connection_info or not self.replicas or connection_info.get(
                'database', connection_info.get('dbname')) == 'postgres':
            return self.primary, None
        need = self.required_lsn() if self.read_your_writes else None
        eligible, weights, reason = [], [], None
        ineligible = self.table.ineligible
        for target in self.replicas:
            why = BANNED if target in exclude else ineligible(target.index, self.max_lag_ms, need)
            if why is None:
                eligible.append(target)
                weights.append(target.weight)
            else:
                self.fallbacks[target.index][why] += 1
                reason = why if reason is None else max(reason, why)
        if eligible:
            return random.choices(eligible, weights)[0], None
        return self.primary, reason

    def rewrite(self, connection_info, target):
        """``connection_info`` pointed at ``target`` (only host and port change)."""
        info = dict(connection_info)
        if 'dsn' in info:
            return info
        info.pop('host', None)
        if target.host:
            info['host'] = target.host
        info['port'] = target.port
        return info

    def borrow(self, pool, connection_info):
        """Borrow from ``pool`` on the chosen server; a replica that fails to connect is
        banned and the next choice is tried, ending on the primary."""
        monitor = self.monitor
        if monitor is not None and monitor.pid != os.getpid():
            monitor.ensure_started()
        if not pool._readonly:
            thread = self._local
            if getattr(thread, 'last_read', None) is not None and getattr(
                    threading.current_thread(), 'cursor_mode', None) == 'ro->rw':
                # Odoo retries a read-only request that wrote, on the primary.
                self.fallbacks[thread.last_read][WRITE] += 1
                self.fallbacks[0][WRITE] += 1
                thread.last_read = None
            self.writes[0] += 1
            return pool._borrow(connection_info)
        tried = set()
        while True:
            target, reason = self.choose(connection_info, tried)
            try:
                cnx = pool._borrow(self.rewrite(connection_info, target))
            except psycopg2.OperationalError as exc:
                if target is self.primary:
                    raise
                message = str(exc)
                if not ('database' in message and 'does not exist' in message):
                    # A database the replica does not have yet (just created) is not a
                    # replica failure: that borrow just goes elsewhere.
                    self.table.ban(target.index, self.ban_time, exc)
                tried.add(target)
                continue
            self.reads[target.index] += 1
            if reason is not None:
                self.fallbacks[0][reason] += 1
            self._local.last_read = target.index
            return cnx

    def note_write_fallback(self):
        """A read-only cursor's request wrote and is retried on the primary (16/17 routes)."""
        last = getattr(self._local, 'last_read', None)
        if last is not None:
            self.fallbacks[last][WRITE] += 1
        self.fallbacks[0][WRITE] += 1
        self._local.last_read = None

    def stop(self):
        if self.monitor is not None:
            self.monitor.stop()

    def take_counts(self):
        """Counters since the last call (the health thread adds them to the shared rows)."""
        with self._counts_lock:
            counts = self.reads, self.writes, self.fallbacks
            self._reset_counts()
        return counts


WRITTEN_LSN_SQL = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"


def written_lsn(cnx):
    """WAL position after the last commit on the primary ``cnx`` (read-your-writes): a replica
    whose replay position reached it has replayed that commit."""
    with cnx.cursor() as cur:
        cur.execute(WRITTEN_LSN_SQL)
        return cur.fetchone()[0]
