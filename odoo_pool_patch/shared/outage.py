"""Waiting through a PostgreSQL outage: one prober per server, borrowers wait for it.

When opening a connection fails because the server is restarting, shutting
down, starting up, recovering from a crash, or (for a server this instance has
reached before) refusing connections, the borrower does not fail at once: it
waits for the server to come back, up to ``db_pool_wait_timeout`` from the
start of its borrow, then fails with an error naming the server, since when it
is down and the last error. Only one process per instance, and one thread in
it, tries to connect meanwhile (the *prober*); the others watch its row, and
borrowers that would open a connection wait before they take a budget slot.
Replicas have no row: the router bans them and moves on.

Protocol: one row per server in the outage region of :mod:`.shared_state`
(``OUT_BASE + i * U_FIELDS``; a process-local copy when the shared state is off).
Every write is made under ``SharedState.locked()``; the reads outside it are
hints that the locked step re-checks.

    fields   U_IDENT     server identity (host and port hash, 0: free row)
             U_DOWN      wall ms the outage was first seen; 0: up
             U_PROBER    process row + 1 of the prober; 0: none
             U_UNTIL     wall ms its lease ends (renewed at every attempt)
             U_ERROR     kind of the last failure (index in KINDS)
             U_GEN       restarts seen: +1 when the server comes back with another
                         postmaster start time than U_STARTED (restart, failover)
             U_REACHED   1 once any process connected to it (refusals count as an
                         outage only then: a wrong port still fails at once)
             U_STARTED   pg_postmaster_start_time() in microseconds, as last read
    header   H_OUTAGES   rows DOWN: the one cell a borrower reads (lock-free)

    UP -> DOWN        a connect failed with an outage error: the failing process
                      sets U_DOWN, becomes the prober (U_PROBER, U_UNTIL),
                      H_OUTAGES += 1.
    DOWN, prober      one thread of the prober's process connects after a backoff
                      (BACKOFF doubling to BACKOFF_MAX, +-25% jitter); a failure
                      renews the lease and records the error kind. When the last
                      waiter of the prober's process leaves (served elsewhere,
                      timed out, interrupted) it clears U_PROBER.
    DOWN, others      never connect; re-read the row every WAIT_POLL (jittered);
                      take the lease when it is free, expired (LEASE after the
                      last attempt) or its holder's row is not alive (crash,
                      SIGKILL: the liveness lock is gone).
    DOWN -> UP        any connect that succeeds: U_DOWN = 0, U_PROBER = 0,
                      H_OUTAGES -= 1; U_GEN += 1 if U_STARTED changed.
    give up           a borrower past its deadline raises; the row stays DOWN
                      and another process takes the lease when it needs one.

A crash at any step leaves at worst a row DOWN with a dead prober, which the
next waiter takes over at once. Connections opened before a restart (their
``cnx.pooled.gen`` differs from ``U_GEN``) are dropped when next reused, taken or
swept, not discovered one request at a time; a connect refused once by a load
balancer, with the server never restarted, drops nothing.
"""
import random
import threading
import time
import weakref

import psycopg2

from .. import after_fork
from . import shared_state as ss

BACKOFF = 0.05          # first retry of the prober, seconds
BACKOFF_MAX = 1.0       # longest pause between two attempts
WAIT_POLL = 0.05        # how often a waiting borrower re-reads the row
LEASE = 2 * BACKOFF_MAX  # seconds a prober that stopped trying keeps the lease

KINDS = ('failed', 'shutting down', 'starting up', 'in recovery', 'not accepting connections',
         'closed the connection', 'refused the connection', 'unreachable')
# libpq's texts (the server's, in English: a translated lc_messages is only caught by the
# client-side errors below) -> kind. Checked in this order.
_OUTAGE_TEXTS = (
    ('the database system is shutting down', 1),
    ('the database system is starting up', 2),
    ('the database system is in recovery mode', 3),
    ('the database system is not yet accepting connections', 4),
    ('the database system is not accepting connections', 4),
    ('terminating connection due to administrator command', 1),
    ('server closed the connection unexpectedly', 5),
    ('could not receive data from server', 5),
    ('ssl syscall error: eof detected', 5),
    ('ssl connection has been closed unexpectedly', 5),
)
# Errors that also mean "nobody listens" on a wrong host or port: an outage only for a
# server reached before.
_REFUSED_TEXTS = (
    ('connection refused', 6), ('no such file or directory', 6), ('connection reset by peer', 5),
    ('timeout expired', 7), ('no route to host', 7), ('network is unreachable', 7),
)


class OutageTimeout(psycopg2.OperationalError):
    """The server stayed unreachable for the whole ``db_pool_wait_timeout``."""


def classify(exc, reached):
    """The kind of outage ``exc`` (a failed connect) shows, or None if it is no outage
    (authentication, unknown database, TLS configuration, a standby without hot standby,
    too many clients...)."""
    if not isinstance(exc, psycopg2.OperationalError) or isinstance(exc, OutageTimeout):
        return None
    text = str(exc).lower()
    if 'hot standby mode is disabled' in text:
        return None
    for needle, kind in _OUTAGE_TEXTS:
        if needle in text:
            return kind
    if reached:
        for needle, kind in _REFUSED_TEXTS:
            if needle in text:
                return kind
    return None


def server_of(info):
    """``host:port`` of a connection_info dict (its ``dsn`` URI included)."""
    if 'dsn' in info:
        from psycopg2.extensions import parse_dsn
        info = dict(parse_dsn(info['dsn']), **{k: v for k, v in info.items() if k != 'dsn'})
    host = info.get('hostaddr') or info.get('host') or 'local socket'
    return f"{host}:{info.get('port') or 5432}"


def now_ms():
    return int(time.time() * 1000)


class _LocalState:
    """The outage rows of one process when the shared state is off."""

    def __init__(self):
        self.cells = [0] * (ss.N_OUT * ss.U_FIELDS + 1)
        self.outages = ss.Outage.all(self.cells, base=0)
        self.flag = ss.N_OUT * ss.U_FIELDS      # rows down (H_OUTAGES of the shared state)
        self.row = 0
        self._lock = threading.RLock()

    def locked(self):
        return self

    def __enter__(self):
        self._lock.acquire()
        return self.cells

    def __exit__(self, *exc):
        self._lock.release()

    def alive(self, row):
        return True


class _SharedRows:
    """The outage rows of the shared state, seen by this process (``row``: its process row)."""

    def __init__(self, budget):
        self.budget = budget
        self.cells = budget.state.cells
        self.outages = ss.Outage.all(self.cells)
        self.flag = ss.H_OUTAGES

    @property
    def row(self):
        return self.budget.row

    def locked(self):
        return self.budget.state.locked()

    def alive(self, row):
        return self.budget.state.alive(row)


class Outages:
    """The outage rows of an instance, and the waiting borrowers of this process."""

    def __init__(self, budget=None):
        self.rows = _SharedRows(budget) if budget is not None else _LocalState()
        self.cells, self.flag = self.rows.cells, self.rows.flag
        self._index = {}                # server -> its Outage row
        self._probing = {}              # server -> threading.Lock: one prober thread here
        self._waiting = {}              # server -> borrowers of this process in _wait
        self._count_lock = threading.Lock()
        self._reached = set()           # servers this process connected to
        self._last_error = {}           # server -> last error text seen by this process
        _all.add(self)

    # ------------------------------------------------------------------ rows
    def _row(self, server):
        """``server``'s :class:`~.shared_state.Outage` row (found or claimed; checked on
        every use: with more servers than rows, another process may have reused it)."""
        key = ss.server_ident(server)
        row = self._index.get(server)
        if row is not None and row.ident == key:
            return row
        rows = self.rows
        with rows.locked() as cells:
            free = None
            for row in rows.outages:
                if row.ident == key:
                    break
                if free is None and not row.ident:
                    free = row
            else:
                if free is None:        # more servers than rows: reuse an up row
                    free = next((row for row in rows.outages if not row.down), rows.outages[0])
                    if free.down:
                        cells[rows.flag] -= 1
                free.clear()
                free.ident = key
                row = free
        self._index[server] = row
        return row

    def generation(self, server):
        """(cell, value) of the server's restart generation, stamped on each new connection."""
        row = self._row(server)
        return row.cell('gen'), row.gen

    # ------------------------------------------------------------------ connecting
    def await_up(self, server, deadline, timeout=None):
        """Before taking a slot: while ``server`` is down and another process (or another
        thread here) probes it, wait without a slot; raise past ``deadline``."""
        row, rows = self._row(server), self.rows
        probing = self._probing.get(server)
        while row.down:
            prober = row.prober
            if not prober or row.until <= now_ms() or not rows.alive(prober - 1):
                return                  # nobody probes: go and take the lease
            if prober == rows.row + 1 and (probing is None or not probing.locked()):
                return                  # our process's lease, no thread on it
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(server, row, timeout)
            time.sleep(min(WAIT_POLL * random.uniform(0.5, 1.5), max(deadline - now, 0.001)))

    def connect(self, connect, server, deadline, timeout=None):
        """``connect()`` to ``server``, waiting through an outage until ``deadline``
        (monotonic). Errors that are no outage are raised at once."""
        row = self._row(server)
        if time.monotonic() >= deadline:
            if row.down:
                raise self._timeout(server, row, timeout)
            return connect()        # db_pool_wait_timeout = 0: no waiting
        if not row.down:
            cnx = self._attempt(connect, server, row, self._was_reached(server, row))
            if cnx is not None:
                return cnx
        with self._count_lock:
            self._waiting[server] = self._waiting.get(server, 0) + 1
        try:
            return self._wait(connect, server, row, deadline, timeout)
        finally:
            with self._count_lock:
                self._waiting[server] -= 1
                last = not self._waiting[server]
            if last:
                self._leave_lease(row)

    def _attempt(self, connect, server, row, reached):
        """``connect()`` once: the connection, or None after an outage error (the row
        marked down, this process its prober if nobody was); other errors are raised."""
        try:
            cnx = connect()
        except psycopg2.OperationalError as exc:
            kind = classify(exc, reached)
            if kind is None:
                raise
            self._last_error[server] = str(exc).strip()
            self._mark_down(row, kind)
            return None
        self._up(server, row, cnx)
        return cnx

    def _was_reached(self, server, row):
        return server in self._reached or bool(row.reached)

    def _up(self, server, row, cnx):
        first = server not in self._reached
        if not (first or row.down or not row.started):
            return
        self._reached.add(server)
        started = postmaster_started(cnx) if (row.down or not row.started) else None
        with self.rows.locked() as cells:
            row.reached = 1
            if row.down:
                row.down = 0
                row.prober = 0
                row.until = 0
                cells[self.rows.flag] -= 1
                if started is None or (row.started and started != row.started):
                    row.gen += 1        # restarted (or cannot tell): drop older connections
            if started:
                row.started = started
        self._last_error.pop(server, None)

    def _mark_down(self, row, kind):
        rows = self.rows
        me = rows.row + 1
        with rows.locked() as cells:
            if not row.down:
                row.down = now_ms()
                row.prober = me
                cells[rows.flag] += 1
            if row.prober == me:        # the lease runs from the last try
                row.until = now_ms() + int(LEASE * 1000)
            row.error = kind

    def _leave_lease(self, row):
        """The last waiter of this process left: free the lease for other processes."""
        rows = self.rows
        me = rows.row + 1
        if row.prober != me:
            return
        with rows.locked():
            if row.prober == me:
                row.prober = 0
                row.until = 0

    def _take_lease(self, row):
        """True if this process is (or just became) the prober of the row."""
        rows = self.rows
        me = rows.row + 1
        prober = row.prober
        if prober == me:
            return True
        if prober and row.until > now_ms() and rows.alive(prober - 1):
            return False
        with rows.locked():
            prober = row.prober
            if prober != me and prober and row.until > now_ms() and rows.alive(prober - 1):
                return False
            if not row.down:
                return False
            row.prober = me
            row.until = now_ms() + int(LEASE * 1000)
        return True

    def _wait(self, connect, server, row, deadline, timeout):
        probing = self._probing.setdefault(server, threading.Lock())
        pause = BACKOFF
        next_try = 0.0
        while True:
            if not row.down:            # up again: connect ourselves
                cnx = self._attempt(connect, server, row, True)
                if cnx is not None:
                    return cnx
            elif time.monotonic() >= next_try and self._take_lease(row) and \
                    probing.acquire(False):
                try:
                    cnx = self._attempt(connect, server, row, True)
                finally:
                    probing.release()
                if cnx is not None:
                    return cnx
                next_try = time.monotonic() + pause * random.uniform(0.75, 1.25)
                pause = min(pause * 2, BACKOFF_MAX)
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(server, row, timeout)
            time.sleep(min(WAIT_POLL * random.uniform(0.5, 1.5), max(deadline - now, 0.001)))

    def _timeout(self, server, row, timeout):
        since = row.down
        error = self._last_error.get(server) or \
            f'the server {KINDS[row.error]} (seen by the prober process)'
        when = time.strftime('%H:%M:%S', time.localtime(since / 1000)) if since else '?'
        return OutageTimeout(
            f'db_pooling: the PostgreSQL server {server} has been unavailable since {when} '
            f'and did not come back within db_pool_wait_timeout = '
            f'{timeout if timeout is not None else "?"} s. '
            f'Last error: {error.splitlines()[0] if error else "?"}. Check that PostgreSQL '
            f'runs and accepts connections (its log says why it stopped); raise '
            f'db_pool_wait_timeout to ride out longer restarts or failovers.')


def opened_before_restart(cnx):
    """Whether ``cnx`` was opened before its server's last restart (its generation is
    not its row's any more); False for one without a generation (a replica's)."""
    record = cnx.pooled
    cell = record.gen_cell
    return cell is not None and record.gen_cells[cell] != record.gen


def postmaster_started(cnx):
    """The server's start time in microseconds (one round trip), None if unknown."""
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1e6)::bigint')
            started = cur.fetchone()[0]
        cnx.rollback()
        return started
    except psycopg2.Error:
        try:
            cnx.rollback()
        except psycopg2.Error:
            pass
        return None


_LOCAL = [None]
_all = weakref.WeakSet()


def outages_for(budget):
    """The :class:`Outages` of ``budget``'s shared state (or of this process without one)."""
    if budget is not None:
        outages = budget.__dict__.get('outages')
        if outages is None:
            outages = budget.outages = Outages(budget)
        return outages
    if _LOCAL[0] is None:
        _LOCAL[0] = Outages()
    return _LOCAL[0]


def _after_fork_in_child():
    # A thread of the parent may have held these locks at fork time; the child's
    # threads start afresh (the rows in shared memory stay, with the parent as prober).
    for outages in list(_all):
        outages._probing = {}
        outages._last_error = {}
        outages._count_lock = threading.Lock()
        outages._waiting = {}           # the parent's borrowers: none of them is here
        if isinstance(outages.rows, _LocalState):
            outages.rows._lock = threading.RLock()


after_fork.register('outage', _after_fork_in_child)
