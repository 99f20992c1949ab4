"""Health, ban and lag of every server, kept in the shared state for all processes.

One row per server (primary first) in the servers region of
:mod:`.shared_state`. Every process that routes reads runs a small daemon
thread (:class:`Monitor`) that adds its counters to the rows and competes for
one *probe lease*: only the holder probes, so the servers are probed once per
instance, whatever the number of workers. A holder that dies loses the lease
at once (its pid is checked), one that hangs after ``LEASE`` seconds.

Lag is measured by WAL position: the primary's ``pg_current_wal_lsn()``
against each replica's ``pg_last_wal_replay_lsn()``. An idle primary does not
move, so its replicas never look late. In seconds, the lag is the time since
the primary first passed the replica's replay position (the prober keeps the
primary's positions of the last hour), so no clock is compared across
servers.
"""
import collections
import logging
import os
import random
import threading
import time
import weakref

import psycopg2

from .. import after_fork
from ..shared import shared_state as ss
from ..shared.exchange import neutralize
from .router import REASONS, BANNED, LAGGING, PINNED

_logger = logging.getLogger('odoo.sql_db.replicas')

PROBE_INTERVAL = 1.0    # seconds between two probes of every server
TICK = 0.25             # seconds between two passes of a process's thread
LEASE = 15.0            # seconds a silent prober keeps the lease
MAX_BAN_FACTOR = 4      # a ban grows (doubling) up to this many times db_replica_ban_time
KINDS = ('primary', 'replica')


def now_ms():
    return int(time.time() * 1000)


def ident(target):
    """A stable identity of a server, to notice a configuration change."""
    return ss.server_ident(target.name)


class ServerTable:
    """The shared rows of the servers of one instance (:class:`~.shared_state.Server`,
    one per target by its index; the probe's :class:`~.shared_state.Lease`)."""

    def __init__(self, state, targets):
        if len(targets) > ss.N_SRV:
            raise ValueError(f'at most {ss.N_SRV - 1} replicas are supported in db_replicas')
        self.state, self.targets = state, targets
        self.servers = ss.Server.all(state.cells)
        self.lease = ss.Lease(state.cells)
        with state.locked():
            for target in targets:
                server = self.servers[target.index]
                if server.ident != ident(target):
                    server.clear()
                    server.ident = ident(target)
                    server.lag_ms = -1
                server.kind = KINDS.index(target.kind)
                server.weight = target.weight

    def ineligible(self, index, max_lag_ms, need_lsn):
        """Why replica ``index`` may not serve a read now (BANNED, LAGGING, PINNED) or None."""
        server = self.servers[index]
        if server.banned_until > time.time() * 1000:
            return BANNED
        if server.lag_ms > max_lag_ms:
            return LAGGING
        if need_lsn and server.replay_lsn < need_lsn:
            return PINNED
        return None

    def ban(self, index, ban_time, error=None):
        """Ban a replica that failed: ban_time x 2^(failures-1), at most MAX_BAN_FACTOR x,
        +-20% jitter. A replica already banned keeps its ban (many workers may fail at once)."""
        now = now_ms()
        server = self.servers[index]
        with self.state.locked():
            if server.banned_until > now:
                return False
            failures = server.failures + 1
            seconds = min(ban_time * 2 ** (failures - 1), ban_time * MAX_BAN_FACTOR)
            seconds *= 0.8 + 0.4 * random.random()
            server.failures = failures
            server.banned_until = now + max(int(seconds * 1000), 1)
        target = self.targets[index]
        reason = str(error).strip().splitlines()[0] if error else 'failed'
        _logger.warning('db_pooling: replica %s gets no reads for %.0f s (failure %d: %s); '
                        'read-only cursors go to the other replicas or the primary meanwhile',
                        target.name, seconds, failures, reason)
        return True

    def add_counts(self, reads, writes, fallbacks):
        if not any(reads) and not any(writes) and not any(map(any, fallbacks)):
            return
        with self.state.locked() as cells:
            for index in range(len(reads)):
                server = self.servers[index]
                server.reads += reads[index]
                server.writes += writes[index]
                for reason, count in enumerate(fallbacks[index]):
                    cells[server.fallback(reason)] += count

    def status(self, max_lag_ms=None):
        """One plain dict per server (see :func:`servers_status`)."""
        cells, now, rows = self.state.cells, now_ms(), []
        for target in self.targets:
            server = self.servers[target.index]
            banned_until = server.banned_until
            lag_ms = server.lag_ms
            probed = server.probed
            if target.kind == 'primary':
                health = 'down' if probed and not server.probe_ok else 'healthy'
            elif banned_until > now:
                health = 'banned'
            elif max_lag_ms is not None and lag_ms > max_lag_ms:
                health = 'lagging'
            else:
                health = 'healthy'
            rows.append({
                'name': target.name, 'host': target.host, 'port': target.port,
                'kind': target.kind, 'weight': target.weight, 'health': health,
                'banned_until': banned_until / 1000 if banned_until > now else None,
                'failures': server.failures,
                'last_probe': probed / 1000 if probed else None,
                'replay_lsn': server.replay_lsn,
                'lag_bytes': server.lag_bytes if lag_ms >= 0 else None,
                'lag_seconds': lag_ms / 1000 if lag_ms >= 0 else None,
                'reads': server.reads, 'writes': server.writes,
                'fallbacks': {reason: cells[server.fallback(i)]
                              for i, reason in enumerate(REASONS)},
                'connections': server.conns if probed else None,
            })
        return rows

    # ------------------------------------------------------------------ probe lease
    def take_lease(self):
        """True if this process holds (or just took) the probe lease."""
        lease, pid, now = self.lease, os.getpid(), now_ms()
        start = ss.process_start(pid) or 0
        mine = lease.pid == pid and lease.started == start
        if not mine and lease.until > now and ss.process_start(lease.pid) == lease.started:
            return False
        with self.state.locked():
            holder_alive = ss.process_start(lease.pid) == lease.started
            if (lease.pid, lease.started) != (pid, start) and lease.until > now and holder_alive:
                return False
            lease.pid = pid
            lease.started = start
            lease.until = now + int(LEASE * 1000)
        return True

    def record_probe(self, index, ok, replay_lsn=None, lag_bytes=None, lag_ms=None,
                     connections=None):
        server = self.servers[index]
        with self.state.locked():
            server.probed = now_ms()
            server.probe_ok = int(ok)
            if replay_lsn is not None:
                server.replay_lsn = replay_lsn
            if lag_ms is not None:
                server.lag_bytes = lag_bytes
                server.lag_ms = lag_ms
            if connections is not None:
                server.conns = connections
            if ok and index and server.banned_until <= now_ms():
                server.failures = 0

    def note_replayed(self, index, replay_lsn):
        """A fresher replay position of replica ``index``, read by a borrower (lock-free:
        only ever raised; a race that keeps the older value just pins a few reads)."""
        server = self.servers[index]
        if server.replay_lsn < replay_lsn:
            server.replay_lsn = replay_lsn

    def banned(self, index):
        return self.servers[index].banned_until > now_ms()


PRIMARY_SQL = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, "
               "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
               "AND usename = current_user AND pid <> pg_backend_pid())")
REPLICA_SQL = ("SELECT pg_is_in_recovery(), "
               "pg_wal_lsn_diff(COALESCE(pg_last_wal_replay_lsn(), pg_current_wal_lsn()), "
               "'0/0')::bigint, "
               "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
               "AND usename = current_user AND pid <> pg_backend_pid())")


class Prober:
    """Probes every server once (the lease holder's thread calls :meth:`probe`)."""

    def __init__(self, table, base_info):
        self.table, self.base_info = table, dict(base_info)
        self.connections = {}
        self.primary_positions = collections.deque(maxlen=3600)   # (lsn, ms) when it moved
        self.warned = set()

    def _query(self, target, sql):
        cnx = self.connections.get(target.index)
        if cnx is not None and not cnx.closed:
            try:
                return self._run(target, cnx, sql)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                # A session the server ended since the last probe (it restarted while
                # banned: banned servers are not probed): judge the server on a new one.
                # A statement timeout is the server's answer: no second wait.
                if isinstance(exc, psycopg2.extensions.QueryCanceledError):
                    raise
        info = dict(self.base_info, dbname='postgres', port=target.port,
                    application_name='odoo-db_pooling-probe', connect_timeout=3,
                    options='-c statement_timeout=3000')
        info.pop('database', None)
        info.pop('host', None)
        if target.host:
            info['host'] = target.host
        cnx = self.connections[target.index] = psycopg2.connect(**info)
        cnx.autocommit = True
        return self._run(target, cnx, sql)

    def _run(self, target, cnx, sql):
        try:
            with cnx.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()
        except psycopg2.Error:
            self.close(target.index)
            raise

    def close(self, index=None):
        for key in [index] if index is not None else list(self.connections):
            cnx = self.connections.pop(key, None)
            if cnx is not None:
                try:
                    cnx.close()
                except psycopg2.Error:
                    pass

    def lag_ms(self, replay_lsn, now):
        """Milliseconds since the primary first passed ``replay_lsn`` (0 if it has not)."""
        for lsn, when in self.primary_positions:
            if lsn > replay_lsn:
                return now - when
        return 0

    def probe(self):
        table, primary = self.table, self.table.targets[0]
        now = now_ms()
        try:
            primary_lsn, connections = self._query(primary, PRIMARY_SQL)
            if not self.primary_positions or self.primary_positions[-1][0] != primary_lsn:
                self.primary_positions.append((primary_lsn, now))
            table.record_probe(0, True, primary_lsn, 0, 0, connections)
        except psycopg2.Error as exc:
            primary_lsn = None
            table.record_probe(0, False)
            _logger.warning('db_pooling: cannot probe the primary %s: %s', primary.name,
                            str(exc).strip().splitlines()[0])
        for target in table.targets[1:]:
            if table.banned(target.index):
                continue
            try:
                in_recovery, replay_lsn, connections = self._query(target, REPLICA_SQL)
            except psycopg2.Error as exc:
                table.record_probe(target.index, False)
                table.ban(target.index, self.ban_time, exc)
                continue
            if not in_recovery and target.index not in self.warned:
                self.warned.add(target.index)
                _logger.warning('db_pooling: replica %s is not in recovery (a primary, or a '
                                'promoted replica): its reads may miss the primary\'s writes; '
                                'remove it from db_replicas', target.name)
            if primary_lsn is None or not in_recovery:
                table.record_probe(target.index, True, replay_lsn, connections=connections)
                continue
            lag_bytes = max(primary_lsn - replay_lsn, 0)
            table.record_probe(target.index, True, replay_lsn, lag_bytes,
                               self.lag_ms(replay_lsn, now) if lag_bytes else 0, connections)


class Monitor:
    """The per-process thread: adds counters to the shared rows; probes when it holds
    the lease. Started lazily by the first routed borrow of each process (threads do
    not survive fork)."""

    def __init__(self, router, base_info, interval=None):
        self.router = router
        self.prober = Prober(router.table, base_info)
        self.prober.ban_time = router.ban_time
        self.interval = interval or PROBE_INTERVAL
        self.pid = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        _monitors.add(self)

    def after_fork_in_child(self):
        # A borrower of the parent starting the thread may have held the lock at fork.
        self._lock = threading.Lock()
        self.router.after_fork_in_child()
        # The parent's probe sessions: pointed away, so that freeing them here (ensure_started
        # drops them) cannot end them under the parent's prober.
        connections, self.prober.connections = self.prober.connections, {}
        for cnx in connections.values():
            neutralize(cnx)

    def ensure_started(self):
        if self.pid == os.getpid():
            return
        with self._lock:
            if self.pid == os.getpid():
                return
            self.pid = os.getpid()
            self._stop = threading.Event()
            self.prober.connections = {}      # a forked child must not use the parent's
            self.prober.primary_positions.clear()
            self.router.reset_counts()
            threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                             name='db_pooling-replicas').start()

    def stop(self):
        self._stop.set()
        self.pid = None

    def _run(self, stop):
        next_probe = 0.0
        while not stop.is_set() and self.pid == os.getpid():
            try:
                self.flush()
                now = time.monotonic()
                if now >= next_probe and self.router.table.take_lease():
                    next_probe = now + self.interval
                    self.prober.probe()
            except Exception:
                _logger.exception('db_pooling replica monitor failed; will retry')
            stop.wait(TICK)
        self.prober.close()

    def flush(self):
        self.router.table.add_counts(*self.router.take_counts())


ACTIVE = {}     # {'router': Router, 'monitor': Monitor} once routing is set up in this process
_monitors = weakref.WeakSet()


def _after_fork_in_child():
    after_fork.each(_monitors, Monitor.after_fork_in_child)


after_fork.register('replica_health', _after_fork_in_child)


def start_routing(state, targets, settings, base_info, required_lsn=None, interval=None):
    """A :class:`~.replicas.Router` over the shared rows of ``state``, with its monitor
    thread (started by the first routed borrow of each process)."""
    from .router import Router
    router = Router(targets, ServerTable(state, targets), settings, required_lsn)
    router.monitor = Monitor(router, base_info, interval)
    ACTIVE.update(router=router, monitor=router.monitor)
    return router


def servers_status(router=None):
    """[{name, host, port, kind, weight, health, banned_until, lag_bytes, lag_seconds, reads,
    writes, fallbacks: {reason: count}, connections, ...}] for every server, primary first,
    instance-wide (from the shared state). [] when replica routing is off."""
    router = router or ACTIVE.get('router')
    if router is None:
        return []
    return router.table.status(router.max_lag_ms)
