"""Read-only routing: the primary plus the replicas of ``db_replicas``, chosen per borrow.

A read-only pool (Odoo 18+'s ``_Pool_readonly``, or the 16/17 one of
:mod:`.replica_routes`) gets a :class:`Router`. On every borrow the router
picks a usable replica by weight (when the budget is full, keeping nine times
out of ten to one the pool already holds an idle connection to) and rewrites the
host/port of the DSN; the
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

from ..dsn import dsn_key
from ..errors import ConfigError

BANNED, LAGGING, PINNED, WRITE = range(4)
# Chance that a read stays on a replica its pool holds an idle connection to, when the
# weighted pick is another replica the pool has none to and no room to open one without
# closing another (a full budget). Connections cannot move between processes: then,
# switching replicas at every borrow would close and open a connection almost every time.
STICK = 0.9
REASONS = ('banned', 'lagging', 'pinned', 'write')


def database_of(connection_info):
    """The database of an Odoo connection_info dict (``database`` or its ``dbname``
    alias), None for the URI form (``dsn``)."""
    if 'dsn' in connection_info:
        return None
    return connection_info.get('database', connection_info.get('dbname'))


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
        # host:port of the replicas (outage.server_of): the pool does not wait through
        # their outages, the router bans them and moves on
        self.replica_names = frozenset(target.name for target in targets[1:])
        self.primary = targets[0]
        self.replicas = [t for t in targets[1:] if t.weight > 0]
        self.table = table
        self.max_lag_ms = int(settings.replica_max_lag * 1000)
        self.ban_time = settings.replica_ban_time
        self.read_your_writes = settings.replica_read_your_writes
        self.required_lsn = required_lsn or (lambda: None)
        self.monitor = None         # replica_health.Monitor, set by start_routing
        self.primary_pool = None    # the read/write pool routed last (it lends to reads)
        self.primary_infos = {}     # database -> connection_info of its last write borrow
        self._local = threading.local()
        self._counts_lock = threading.Lock()
        self.reset_counts()

    def after_fork_in_child(self):
        """The parent's health thread may have held the counts' lock at fork (it takes
        them every tick); the counts not yet flushed are the parent's to add."""
        self._counts_lock = threading.Lock()
        self.reset_counts()

    def reset_counts(self):
        n = len(self.targets)
        self.reads, self.writes = [0] * n, [0] * n
        self.fallbacks = [[0] * len(REASONS) for _ in range(n)]

    # ------------------------------------------------------------------ choice
    def choose(self, connection_info, exclude=(), pool=None):
        """(target, reason the primary serves it or None, replicas only pinned, WAL position
        needed) for a read-only borrow of ``pool``: a usable replica by weight, preferring
        one ``pool`` holds an idle connection to (see STICK). Replicas whose only fault is
        that their last known replay position is behind this session's last write are
        returned, for :meth:`_replayed` to ask them directly."""
        if 'dsn' in connection_info or not self.replicas or database_of(
                connection_info) == 'postgres':
            return self.primary, None, (), None
        need = self.required_lsn() if self.read_your_writes else None
        eligible, weights, reason, pinned = [], [], None, []
        ineligible = self.table.ineligible
        for target in self.replicas:
            why = BANNED if target in exclude else ineligible(target.index, self.max_lag_ms, need)
            if why is None:
                eligible.append(target)
                weights.append(target.weight)
                continue
            if why == PINNED:
                pinned.append(target)       # counted once the primary serves the read
            else:
                self.fallbacks[target.index][why] += 1
            reason = why if reason is None else max(reason, why)
        if not eligible:
            return self.primary, reason, pinned, need
        picked = random.choices(eligible, weights)[0]
        if pool is not None and len(eligible) > 1 and pool.holds_idle() and \
                random.random() < STICK and \
                not pool.holds_idle(dsn_key(self.rewrite(connection_info, picked))) and \
                not pool.has_room():
            # No room for a connection on the weighted pick without closing another: keep
            # to a replica this pool already holds an idle connection to for this
            # database. Switching at the rate 1 - STICK keeps the long-run share of each
            # replica equal to its weight.
            for target in eligible:
                if pool.holds_idle(dsn_key(self.rewrite(connection_info, target))):
                    return target, None, (), need
        return picked, None, (), need

    def _replayed(self, pool, connection_info, pinned, need):
        """A connection of ``pool`` to one of the ``pinned`` replicas that has replayed
        ``need`` by now, or None. Their shared replay positions are up to a probe old,
        while a replica usually replays a commit within milliseconds: asking it costs
        one round trip and keeps the session's next reads off the primary. Only asked
        on a connection the pool holds idle anyway, never at the cost of a new one."""
        for target in pinned:
            info = self.rewrite(connection_info, target)
            if not pool.holds_idle(dsn_key(info)):
                continue
            try:
                cnx = pool.borrow_exact(info)
            except psycopg2.Error:
                continue            # its idle connection was dead and it refuses a new one
            try:
                with cnx.cursor() as cur:
                    cur.execute(REPLAYED_SQL)
                    replayed = cur.fetchone()[0]
                cnx.rollback()
            except psycopg2.Error:
                pool.give_back(cnx, keep_in_pool=False)
                continue
            except BaseException:
                pool.give_back(cnx, keep_in_pool=False)
                raise
            if replayed is not None and replayed >= need:
                self.table.note_replayed(target.index, replayed)
                return target, cnx
            pool.give_back(cnx)
        return None, None

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
        if not pool.readonly:
            thread = self._local
            if getattr(thread, 'last_read', None) is not None and getattr(
                    threading.current_thread(), 'cursor_mode', None) == 'ro->rw':
                # Odoo retries a read-only request that wrote, on the primary.
                self.fallbacks[thread.last_read][WRITE] += 1
                self.fallbacks[0][WRITE] += 1
                thread.last_read = None
            self.writes[0] += 1
            self.primary_pool = pool
            database = database_of(connection_info)
            if database is not None:
                self.primary_infos[database] = connection_info
            return pool.borrow_exact(connection_info)
        tried = set()
        while True:
            target, reason, pinned, need = self.choose(connection_info, tried, pool)
            if pinned and target is self.primary:
                replica, cnx = self._replayed(pool, connection_info, pinned, need)
                if cnx is not None:
                    self.reads[replica.index] += 1
                    self._local.last_read = replica.index
                    return cnx
                for replica in pinned:
                    self.fallbacks[replica.index][PINNED] += 1
            # A read the primary serves takes a connection of the read/write pool, under
            # the very connection_info of its writes (Odoo's read-only one may differ in
            # host, port, user, sslmode...): the one that just wrote, for a read-your-writes
            # read. Odoo sets the read-only session on every cursor, and the pool resets it
            # when the connection is reused.
            owner, info = pool, None
            if target is self.primary and self.primary_pool is not None:
                info = self.primary_infos.get(database_of(connection_info))
                if info is not None:
                    owner = self.primary_pool
            if info is None:
                info = self.rewrite(connection_info, target)
            try:
                cnx = owner.borrow_exact(info)
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
            self.reset_counts()
        return counts


REPLAYED_SQL = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint"
WRITTEN_LSN_SQL = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"


def written_lsn(cnx):
    """WAL position after the last commit on the primary ``cnx`` (read-your-writes): a replica
    whose replay position reached it has replayed that commit."""
    with cnx.cursor() as cur:
        cur.execute(WRITTEN_LSN_SQL)
        return cur.fetchone()[0]
