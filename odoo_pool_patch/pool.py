"""The per-process connection pool: a drop-in replacement for Odoo's ``ConnectionPool``.

Locks, in the order they may be taken: each entry says what may be taken while holding
that lock, and none is taken while holding one listed after it (test_lock_naming.py
checks this order and the names below on the source)::

    pool lock       ConnectionPool._lock, one per pool (its waiters' Conditions share it):
                    the books (_idle, _used, _opening, _closing, _exiting, _waiters,
                    _budget_waits, stats). Taken with no lock held, never twice
                    (not re-entrant, never two pools' at once). Under it: the maintenance
                    lock (maintenance.start, a process's first borrow), the exchange lock
                    (IdleExchange.changed, add_pool), the shared lock (budget.try_acquire,
                    release, claim_shed, claim_idle_eviction). Never a network round trip
                    (connect, reset, Terminate); the only waits under it are for the shared
                    lock and on a waiter's Condition (which releases it).
    exit lock       Parking._exit_lock: the parked connections this process closed and
                    waits for. Taken with no lock held; under it: the shared lock
                    (budget.release).
    probe lock      Outages._probing[server]: try-acquired by the one thread of a process
                    that probes a server that is down, held across its connect attempt;
                    taken with no lock held; under it: the shared lock (its outage row).
    maintenance     maintenance._lock: the timer thread's pools and its start. Nothing
                    under it.
    exchange lock   IdleExchange._lock: this process's idle and in-use counts per database
                    and its offer entries (its own cells: no shared lock), its shells, its
                    pools. Nothing under it (the first offer starts the listener thread).
    shared lock     SharedState.locked(): the state's thread lock, then lockf on byte 0 of
                    the file (the processes of the instance; the kernel drops it when its
                    holder dies): every shared cell more than one process writes (slots,
                    queue, hand-over tokens, lots, outage and server rows). Last: nothing
                    is taken under it, and one thread never enters it twice (the inner exit
                    would release the outer's lockf). Only short local steps under it:
                    cells, a parked socket's non-blocking send or receive, liveness checks
                    (fcntl, /proc).

Locks apart, held with no other and taking none: IdleExchange._wrap_lock (one stand-in
start-up at a time, a local connect of up to 2 s), Outages._count_lock, Router._counts_lock
and Monitor._lock (replicas); outage rows without a shared state use a process-local lock
in the shared lock's place. A helper's name says which lock its caller holds:
a name ending in ``_locked`` the ``_lock`` of the object it is called on (the pool lock
here, the exchange lock in exchange.py), in ``_shared_locked`` the shared lock (budget,
parking, shared_state: they take the mapped ``cells``), in ``_exit_locked`` the exit lock.

State machine of one connection (every transition happens under ``_lock``)::

    (opening) --connect ok--> IN USE --give_back--> IDLE --borrow--> IN USE
        |                        |  \\--keep_in_pool=False, closed, expired--> (closed)
        connect failed           \\--close_all, closed from outside--> (dropped)
        v                                IDLE --idle timeout, max lifetime, dead socket,
     (slot freed)                               close_all, room for another DSN--> (closed)

A *slot* is counted for every connection in use, idle or being opened; there
are never more than ``maxconn`` slots. When none is free a borrower waits in a
FIFO queue. A freed slot is handed directly to the head of the queue (as the
idle connection itself when its DSN matches, otherwise as the right to open a
new one after closing the idle connection), so a newcomer can never overtake
a waiter. With the shared budget, a connection given back goes first to a
thread of this process waiting in the budget's queue for the same database
(a bounded number of times in a row, see ``_hand_over_locked``).

Parking (see :mod:`.parking`) is deferred inside a request (:func:`deferred_parking`,
around Odoo's request dispatch): a connection given back there stays IDLE here, so
the request's next cursor on the same database (Odoo opens one to load the registry
and match the route, then one for the call) reuses it without a hand-over; at the
end of the request the pool parks those of its idle connections another process
wants (:meth:`ConnectionPool.park_wanted`), each by the same locked steps as a
park at give-back (out of IDLE, counted in ``_closing`` while it travels, parked or
back to IDLE). A give-back parks at once when another process is waiting for that
database right now.

Network round trips (connect, reset, health check) are never made while
holding the lock. Idle eviction, max lifetime, dead-socket detection, leaked
connection recovery and the leak warning run on a maintenance thread (see
:mod:`.maintenance`), so they happen even when nobody borrows.
"""
import collections
import contextlib
import logging
import os
import random
import select
import sys
import threading
import time
import weakref

import psycopg2
import psycopg2.extensions
import psycopg2.sql

from . import after_fork
from .budget import LONG_LIVED_DATABASES
from .dsn import dsn_key, key_database, dsn_equals
from .errors import PoolError, PoolTimeout
from .options import Settings
from . import session_state
from .session_tracking import (SessionTracking, note_privileges, restore_characteristics,
                               run_reset, track)
from .exchange import gss_in_use, neutralize, offerable, session_meta
from .tls import explain_failure, record as record_tls
from .backend_exit import exited, finished, wait_exited
from .conn_record import ensure_record
from .outage import OutageTimeout, opened_before_restart, outages_for, server_of
from .parking import IN_FLIGHT, mark_in_flight
from . import faults
from . import maintenance

# Under odoo.sql_db so Odoo's PostgreSQL log handler (log_db) never logs our
# own messages through a pooled connection.
_logger = logging.getLogger('odoo.sql_db.pool')

_NEW = object()        # grant: a reserved slot, open a new connection in it
_BUDGET = object()     # grant: a reserved local slot; take a slot of the shared budget first
_TAKE = object()       # grant: a reserved local slot; take another process's idle connection
_EVICT = object()      # grant: a reserved local slot; close a parked connection, open in its slot
_MISSING = object()
# libpq keepalives of direct connections: a LISTEN connection idle for hours
# notices a dead server or NAT drop within about a minute and a half.
DIRECT_KEEPALIVES = {'keepalives': 1, 'keepalives_idle': 60, 'keepalives_interval': 10,
                     'keepalives_count': 3}
HANDOFF_BURST = 3      # same-database hand-offs in a row before a freed slot goes to the queue
EXIT_WAIT = 2.0        # seconds a closed connection's slot waits for its backend to exit
HANDOVER_WAIT = 0.005  # seconds the closing thread waits for that when someone needs the slot
# With the exchange and the budget full: how long a borrower that finds no idle connection
# to its database anywhere waits for one in use in another process to come back, rather than
# close a connection to another database and open a backend (fork, authentication, cold
# caches: several ms of server CPU, and that other database may then have none left).
# Measured on Odoo 18's web load at a budget of 12 (docs/benchmarks.rst): 0 ms served 100
# requests a second, 15 ms 139, 50 ms 156 (stock 166-177 in the same runs), 100 ms no better.
AWAIT_BUSY = 0.05
AWAIT_POLL = 0.0005    # its checks without parking (a connection back idle elsewhere)
AWAIT_SLICE = 0.005    # with parking: the wait wakes as one is parked; the other checks
monotonic = time.monotonic


class _Deferral(threading.local):
    active = False          # this thread serves a request (see deferred_parking)
    pools = ()              # pools that kept a connection idle instead of parking it


_DEFERRAL = _Deferral()


def parking_deferred():
    """Whether this thread serves a request under :func:`deferred_parking`."""
    return _DEFERRAL.active


@contextlib.contextmanager
def deferred_parking():
    """While this thread serves one request: connections given back stay idle in
    their pool for the request's next cursor; at the end, those another process
    wants are parked. Nested uses are one."""
    if _DEFERRAL.active:
        yield
        return
    _DEFERRAL.active = True
    try:
        yield
    finally:
        _DEFERRAL.active = False
        pools, _DEFERRAL.pools = _DEFERRAL.pools, ()
        for pool in pools:
            try:                # after the request's work: it must not fail the request
                pool.park_wanted()
            except Exception:   # noqa: BLE001 - (the connection is back idle, see _park)
                _logger.warning('db_pooling: parking at the end of a request failed',
                                exc_info=True)


class PooledConnection(SessionTracking, psycopg2.extensions.connection):
    """Default connection class outside Odoo (the installer uses Odoo's
    ``PsycoConnection`` with the same mixin). A Python subclass is needed: the
    pool keeps its record of the connection in it (``cnx.pooled``, see conn_record)."""


class Holder:
    """Who holds a borrowed connection: for the timeout error and leak warnings."""
    __slots__ = ('since', 'wall_since', 'site', 'thread', 'url', 'warned')

    def __init__(self, site):
        thread = threading.current_thread()
        self.since = monotonic()
        self.wall_since = time.time()
        self.site = site
        self.thread = thread.name
        self.url = getattr(thread, 'url', None)   # set by Odoo's HTTP layer
        self.warned = False

    def describe(self, cnx, now):
        who = f"thread {self.thread!r}" + (f" ({self.url})" if self.url else '')
        return (f"database {key_database(cnx.pooled.key)!r} for {now - self.since:.1f} s "
                f"by {who} at {format_site(self.site)}")


# Frames in these files are plumbing between the real caller and borrow().
_PLUMBING = ('sql_db.py', os.sep + 'registry.py', 'contextlib.py', __file__.rstrip('c'),
             os.sep + 'replicas.py')


def borrow_site(depth=2):
    """(file, line, function) of the first caller outside pool plumbing."""
    frame = sys._getframe(depth)
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_PLUMBING):
        frame = frame.f_back
    code = frame.f_code
    return code.co_filename, frame.f_lineno, code.co_name


def format_site(site):
    return '%s:%d in %s' % site if site else 'unknown'


class _Waiter:
    __slots__ = ('key', 'holder', 'cond', 'grant', 'since')

    def __init__(self, key, holder, lock):
        self.key = key
        self.holder = holder
        self.cond = threading.Condition(lock)
        self.grant = None
        self.since = monotonic()


class _BudgetWait:
    """A borrower of this process waiting in the shared budget's queue, which a thread
    giving back a connection to the same database may serve directly instead."""
    __slots__ = ('key', 'holder', 'cnx', 'event')

    def __init__(self, key, holder):
        self.key = key
        self.holder = holder
        self.cnx = None
        self.event = threading.Event()


class PoolStats:
    """Monotonic counters of one pool (the dashboard sums them across pools)."""
    __slots__ = ('borrows', 'reused', 'opened', 'waits', 'timeouts', 'closed_idle',
                 'closed_lifetime', 'closed_dead', 'closed_room', 'reclaimed_leaked',
                 'dead_replaced', 'leak_warnings', 'shed', 'budget_waits', 'budget_timeouts',
                 # Odoo cursors moved to a new connection when theirs died before its first
                 # statement (see first_statement)
                 'first_statement_retries',
                 # requests run again on a new connection after the server closed theirs
                 # with nothing committed (see request_retry)
                 'request_retries',
                 # budget waiters served with a connection to their database given back by
                 # another thread of this process, instead of a new one
                 'handed_over',
                 # idle connections taken from / given to other processes (db_pool_shared_idle)
                 'taken', 'given',
                 # idle connections parked for any process / taken from the parking (see
                 # parking)
                 'parked', 'unparked',
                 # borrows that waited (up to AWAIT_BUSY) for another process's connection
                 # in use to their database rather than open one
                 'awaited',
                 # How reused connections were reset (db_pool_reset): skipped (clean), narrow
                 # (dirty), full (always mode, or what only DISCARD ALL clears), every
                 # (db_pool_reset_every), checked (idle past db_pool_check_after), rollback
                 # (given back inside a transaction), closed (LOAD), and the kinds of
                 # session state found dirty.
                 'reset_skipped', 'reset_narrow', 'reset_full', 'reset_every', 'reset_checked',
                 'reset_rollback', 'reset_closed',
                 *('dirty_' + name for name in session_state.KINDS))

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class _Room:
    """Grant of a slot taken from an idle connection of another DSN: the
    grantee closes ``victim`` (waiting for its backend to exit), then connects."""
    __slots__ = ('victim',)

    def __init__(self, victim):
        self.victim = victim


class ConnectionPool:
    """Pool of psycopg2 connections shared by the threads or greenlets of one process.

    :param maxconn: most connections open at once (in use, idle, being opened
        or being closed), Odoo's ``db_maxconn``.
    :param readonly: Odoo 18+: cursors of this pool call
        ``set_session(readonly=True)``.
    :param settings: :class:`~.options.Settings`; the class attribute set by
        the installer (from odoo.conf) when not given.
    :param connection_factory: psycopg2 connection class; Odoo's
        ``PsycoConnection`` once installed.
    :param timer_period: seconds between two maintenance passes.
    """
    settings = Settings()
    connection_factory = PooledConnection
    timer_period = 1.0
    budget = None          # a SharedBudget: one connection budget for all processes
    router = None          # a replicas.Router: picks the server per borrow (replica routing)
    _outages = None        # outage.Outages of the budget's state (or of this process)

    def __init__(self, maxconn=64, readonly=False, *, settings=None,
                 connection_factory=None, timer_period=None, budget=None):
        self._maxconn = max(int(maxconn), 1)
        self._readonly = bool(readonly)
        if settings is not None:
            self.settings = settings
        if connection_factory is not None:
            self.connection_factory = connection_factory
        if timer_period is not None:
            self.timer_period = timer_period
        if budget is not None:
            self.budget = budget
        self._lock = threading.Lock()
        self._idle = {}              # dsn key -> [cnx, ...], last freed last (LIFO)
        self._n_idle = 0
        self._used = {}              # cnx -> Holder
        self._lent = set()           # out of the books while it travels (parked, lent): see _send_off_locked
        self._opening = 0            # slots reserved by borrowers that are connecting
        self._closing = 0            # slots of connections whose backend is exiting
        self._exiting = []           # [dup fd, give-up deadline, shed, what the fd is open on]
        self._app_names = {}         # dsn key -> its application_name ('' if none)
        self._name_sqls = {}         # (name, standard_conforming_strings) -> 'SET application_name = ...; '
        self._waiters = collections.deque()
        self._budget_waits = {}      # dsn key -> deque of _BudgetWait, oldest first
        self._handed_in_row = 0
        self._closings = 0           # close_all() calls: a connection lent meanwhile is closed
        self._timer = None
        self._closed = False
        self.stats = PoolStats()
        self._prefixes = (None, None)   # (settings, {role: SET LOCAL timeouts})
        _live_pools.add(self)

    # ------------------------------------------------------------------ Odoo's API
    @property
    def readonly(self):
        return self._readonly

    def __repr__(self):
        mode = 'read-only' if self._readonly else 'read/write'
        return (f"ConnectionPool({mode};used={len(self._used)}/"
                f"count={self._count()}/max={self._maxconn})")

    @property
    def closed(self):
        """Whether :meth:`shutdown` ran."""
        return self._closed

    def exits_pending(self):
        """Whether slots of closed connections wait for their backend to exit (lock-free)."""
        return bool(self._exiting)

    def holds_idle(self, key=None):
        """Whether an idle connection for DSN key ``key`` (any, if None) is here (a
        lock-free estimate)."""
        return bool(self._idle) if key is None else key in self._idle

    def has_room(self):
        """Whether a new connection could be opened now without closing another
        (a lock-free estimate, for the replica choice)."""
        return self._count() < self._maxconn and (self.budget is None or self.budget.has_room())

    def borrowed_for(self, connection):
        """Seconds since ``connection`` was borrowed from this pool; None if it is not
        in use here."""
        holder = self._used.get(connection)
        return None if holder is None else monotonic() - holder.since

    def _dsn_equals(self, dsn1, dsn2):
        return dsn_equals(dsn1, dsn2)

    def borrow(self, connection_info):
        """Return a connection for ``connection_info``, waiting for a free slot if needed
        (on the server the router picks, when replica routing is on)."""
        cnx = (self.router.borrow(self, connection_info) if self.router is not None
               else self.borrow_exact(connection_info))
        # connection_info until its first statement (first_statement), and for good
        # (request_retry moves the cursor to a new connection with it).
        record = cnx.pooled
        record.asked = record.info = connection_info
        return cnx

    def borrow_exact(self, connection_info):
        """Return a connection for exactly ``connection_info``.

        Reuses the connection of that DSN freed last; a reused connection is
        reset as ``db_pool_reset`` says (see :meth:`_reset`) and one found dead
        is replaced transparently. Raises :class:`~.errors.PoolTimeout` (a ``PoolError``)
        after ``db_pool_wait_timeout`` seconds without a free slot.
        """
        key = dsn_key(connection_info)
        holder = Holder(borrow_site())
        budget = self.budget
        outages = self._outages or self._init_outages()
        if outages.cells[outages.flag] and key not in self._idle:
            self._await_server(outages, connection_info, key, holder)
        if budget is not None and budget.exchange is not None and key not in self._idle:
            self._await_in_use(budget.exchange, key)
        with self._lock:
            if self._timer is None:
                self._timer = maintenance.start(self)
                if budget is not None and budget.exchange is not None:
                    budget.exchange.add_pool(self)
            self.stats.borrows += 1
            grant = self._acquire_locked(key, holder, take=True)
        if grant is _TAKE:
            cnx = self._take(key, holder, connection_info)
            if cnx is not None:
                return cnx
            with self._lock:
                self._opening -= 1
                grant = self._acquire_locked(key, holder)
        if grant is _EVICT:
            evicted = False
            try:
                evicted = self._evict_parked()
            finally:                # also on gevent.Timeout, Odoo's SIGXCPU: the local slot back
                if not evicted:
                    with self._lock:
                        self._opening -= 1
                        if self._waiters:
                            self._hand_off_locked()
            if evicted:
                grant = _NEW
            else:
                with self._lock:
                    grant = self._acquire_locked(key, holder, evict=False)
        if (grant is _NEW or grant is _BUDGET or type(grant) is _Room) and \
                budget is not None and budget.exchange is not None and \
                budget.exchange.parking is not None:
            khash = budget.exchange.hash_of(key)
            if khash:
                budget.exchange.parking.want(khash)     # not held here: park it elsewhere
        if grant is _NEW:
            return self._open(connection_info, key, holder)
        if grant is _BUDGET:
            grant = self._wait_for_budget(key, holder)
            if grant is None:
                return self._open(connection_info, key, holder)
        try:
            if type(grant) is _Room:
                close_and_wait((grant.victim,))
                grant = _NEW
            elif self._revive(grant):
                grant.pooled.prefix = self._prefix(grant, key, holder)
                return grant
            else:
                with self._lock:    # dead: open a new one in its slot
                    self._unbook_locked(grant)
                    self._opening += 1
                    self.stats.dead_replaced += 1
                dead, grant = grant, _NEW
                close_and_wait((dead,), timeout=0.5)
        except BaseException:
            with self._lock:
                self._release_grant_locked(grant)
            raise
        return self._open(connection_info, key, holder)

    def _init_outages(self):
        self._outages = outages_for(self.budget)
        return self._outages

    def _await_server(self, outages, connection_info, key, holder):
        """A server of the instance is down: if it is ours and another process (or
        thread) probes it, wait for it here, without taking a slot (see outage)."""
        direct = self._direct_info(connection_info, key)
        server = server_of(direct or connection_info)
        if self.router is None or server not in self.router.replica_names:
            outages.await_up(server, holder.since + self.settings.wait_timeout,
                             self.settings.wait_timeout)

    def _await_in_use(self, exchange, key):
        """Wait up to ``AWAIT_BUSY`` for an idle connection to ``key`` when the budget is
        full, none is idle instance-wide and other processes have some in use (ours
        cannot come back while this thread waits: nested cursors). Not when
        borrowers queue for the budget (overload): nothing stays idle long enough to
        take, and the fair queue is where a slot comes from."""
        khash = exchange.hash_of(key)
        budget = self.budget
        if not khash or not AWAIT_BUSY or self._count() >= self._maxconn or \
                budget.has_room() or budget.waiting():
            return
        parking = exchange.parking
        if parking is not None and parking.count(khash):
            return
        idle, in_use = exchange.elsewhere(khash)
        if idle or not in_use:
            return
        if parking is not None:
            parking.want(khash)     # the process giving one back parks it for us
        with self._lock:
            self.stats.awaited += 1
        deadline = monotonic() + AWAIT_BUSY
        while monotonic() < deadline:
            if parking is not None:
                parking.wait(khash, AWAIT_SLICE)    # wakes as soon as one is parked
            else:
                time.sleep(AWAIT_POLL)
            idle, in_use = exchange.elsewhere(khash)
            if idle or not in_use or key in self._idle or budget.has_room() or (
                    parking is not None and parking.count(khash)):
                return

    def give_back(self, connection, keep_in_pool=True):
        """Return a borrowed connection; ``keep_in_pool=False`` closes it."""
        record = getattr(connection, 'pooled', None)      # (record_of, inlined: hot path)
        owner = self if record is None or record.pool is None else record.pool
        if owner is not self:       # lent by the read/write pool (replica routing)
            return owner.give_back(connection, keep_in_pool)
        with self._lock:
            # Still counted in use for the exchange until it is idle or closed (below).
            holder = self._used.pop(connection, _MISSING)
            if holder is _MISSING:
                if connection.closed or (record is not None and connection in self._idle.get(
                        record.key, ())):
                    # Closed by close_all() while in use, or given back twice.
                    _logger.debug('%r: ignored give_back of a connection it no longer holds', self)
                    return
                raise PoolError('This connection does not belong to the pool')
            note_privileges(connection)         # (cheap: no round trip)
            if record.dirty & session_state.LOAD and keep_in_pool:
                keep_in_pool = False    # a loaded library cannot be unloaded
                self.stats.reset_closed += 1
            if keep_in_pool and not connection.closed and not (
                    record.expires and record.expires <= monotonic()):
                if self._budget_waits and self._hand_over_locked(connection):
                    return
                self._handed_in_row = 0
                park = record.khash and not self._waiters and \
                    self._should_park_locked(connection)
                if park and _DEFERRAL.active and not self.budget.exchange.parking.wanted(
                        record.khash, AWAIT_BUSY):
                    park = False            # for the request's next cursor (see above)
                    if self not in _DEFERRAL.pools:
                        _DEFERRAL.pools += (self,)
                if park:
                    self._send_off_locked(connection)
                    doomed = None
                else:
                    self._push_idle_locked(connection, in_use=-1)
                    if self._waiters:
                        self._hand_off_locked()
                    if self.budget is None or self._waiters or not self.budget.waiting():
                        return
                    # Another process waits for a slot of the shared budget and nobody
                    # here does: give up our least recently used idle connection.
                    doomed, shed = self._claim_shed_locked(1)
                    if not doomed:
                        return
            else:
                doomed, shed = [connection], 0
                if record.khash:
                    self.budget.exchange.changed(record.khash, 0, -1)
            if doomed:
                self._closing += len(doomed)
        if doomed is None:
            self._park(connection)
        else:
            self._retire(doomed, shed)

    def _should_park_locked(self, cnx):
        """Whether to park ``cnx`` rather than keep it idle here: another process
        needed its database lately, nobody waits for the budget, it is clean."""
        exchange = self.budget.exchange
        record = cnx.pooled
        return exchange.parking is not None and self.settings.reset == 'smart' and \
            not record.dirty and not self.budget.waiting() and \
            not (record.expires and record.expires < monotonic() + 5) and \
            exchange.parking.wanted(record.khash)

    def _park(self, cnx):
        """Send ``cnx`` to the parking (counted in ``_closing`` meanwhile); kept idle
        here if it cannot go."""
        exchange = self.budget.exchange
        sent = [False]              # set by the parking inside its locked step
        try:
            try:                    # (a dead one is found out by the taker: fd_readable)
                if offerable(cnx):
                    meta = session_meta(cnx)
                    # Our libpq is pointed at /dev/null before the socket leaves: whatever
                    # happens next (an exception, a close), it cannot drive a parked session.
                    fd = os.dup(cnx.fileno())
                    mark_in_flight(fd)
                    try:
                        neutralize(cnx)
                        exchange.parking.park(cnx.pooled.khash, fd, meta, sent)
                    finally:
                        if not sent[0]:
                            os.dup2(fd, cnx.fileno(), inheritable=False)   # still ours
                        IN_FLIGHT.pop(fd, None)
                        os.close(fd)
            except (OSError, psycopg2.Error):
                pass
        finally:                    # whatever was raised: parked, or back in the books
            self._after_park(cnx, sent[0])

    def park_wanted(self):
        """Park the idle connections another process wants (the end of a request
        that kept them, see :func:`deferred_parking`); each is tried once (one that
        could not go is back in IDLE)."""
        tried = set()
        while True:
            with self._lock:
                if self._closed or self._waiters:
                    return
                for stack in self._idle.values():
                    cnx = stack[-1]
                    if cnx not in tried and cnx.pooled.khash and self._should_park_locked(cnx):
                        break
                else:
                    return
                tried.add(cnx)
                self._remove_idle_locked(cnx, in_use=1)     # as if given back: see _after_park
                self._send_off_locked(cnx)
            self._park(cnx)

    def _after_park(self, cnx, parked):
        exchange = self.budget.exchange
        record = cnx.pooled
        if parked:
            exchange.keep_shell(cnx)
        doomed = None
        with self._lock:
            if parked:
                self._closing -= 1
                self.stats.parked += 1
                exchange.changed(record.khash, 0, -1)
            elif self._closed or self._closings != record.lent_at:
                doomed = [cnx]          # close_all() ran meanwhile: closed too (in _closing)
                exchange.changed(record.khash, 0, -1)
            else:
                self._closing -= 1
                self._push_idle_locked(cnx, in_use=-1)
            if not doomed:
                self._lent.discard(cnx)     # parked (our copy neutralized), or in IDLE again
            if self._waiters:
                self._hand_off_locked()
        if doomed:
            try:
                self._retire(doomed)
            finally:
                self._lent.discard(cnx)     # closed

    def _hand_over_locked(self, cnx):
        """Give ``cnx`` to the oldest borrower of this process waiting in the shared
        budget's queue for the same database: it keeps its slot, and the borrower gets
        a connection at once instead of a new one after some other connection closed.
        At most HANDOFF_BURST in a row, so that the slots this process frees still
        reach the other borrowers of the queue (other processes, other databases)."""
        record = cnx.pooled
        waits = self._budget_waits.get(record.key)
        if not waits or self._handed_in_row >= HANDOFF_BURST:
            return False
        wait = waits.popleft()
        if not waits:
            del self._budget_waits[record.key]
        self._handed_in_row += 1
        record.last_used = monotonic()
        self._used[cnx] = wait.holder       # in use still (give_back did not unbook it)
        self._opening -= 1          # the local slot it reserved: the connection has one
        self.stats.handed_over += 1
        wait.cnx = cnx
        wait.event.set()
        if self._waiters:           # the local slot it reserved is free for them
            self._hand_off_locked()
        return True

    def close_all(self, dsn=None):
        """Close every connection (in use ones too, as stock Odoo) or those of ``dsn``."""
        key = None if dsn is None else dsn_key(dsn)
        with self._lock:
            doomed = [cnx for cnx in self._used if key is None or cnx.pooled.key == key]
            for cnx in doomed:
                self._unbook_locked(cnx)
            for stack_key in [k for k in self._idle if key is None or k == key]:
                stack = self._idle.pop(stack_key)
                self._n_idle -= len(stack)
                for cnx in stack:
                    if cnx.pooled.khash:
                        self.budget.exchange.changed(cnx.pooled.khash, -1)
                doomed.extend(stack)
            self._closings += 1
            self._closing += len(doomed)
        if doomed:
            self._retire(doomed)
            _logger.info('%r: Closed %d connections%s', self, len(doomed),
                         f' to {key_database(key)!r}' if key else '')
        exchange = self.budget.exchange if self.budget is not None else None
        if key is not None and exchange is not None and exchange.parking is not None:
            # Its database is being dropped or renamed: nothing of it may stay parked.
            khash = exchange.hash_of(key)
            if khash and exchange.parking.drain(khash):
                _logger.info('%r: Closed the parked connections to %r', self, key_database(key))

    # ------------------------------------------------------------------ slots
    def _count(self):
        return len(self._used) + self._n_idle + self._opening + self._closing

    def _acquire_locked(self, key, holder, take=False, evict=True):
        """A reused idle connection (now in use), ``_NEW``, ``_BUDGET``, a ``_Room``,
        ``_EVICT`` (if ``evict``) or, if ``take``, ``_TAKE``."""
        if not self._waiters:
            grant = self._grant_locked(key, holder, take, evict)
            if grant is None and self._reclaim_used_locked():
                grant = self._grant_locked(key, holder)
            if grant is not None:
                return grant
        return self._wait_locked(key, holder)

    def _grant_locked(self, key, holder, take=False, evict=False):
        """Take a slot for ``key``: a reused idle connection (booked in use at
        once, so the slot is never counted free in between), ``_TAKE`` (if
        ``take`` and another process offers one), ``_NEW``, a ``_Room``,
        ``_EVICT`` (if ``evict`` and connections are parked) or None when there
        is no slot."""
        stack = self._idle.get(key)
        if stack:
            self._n_idle -= 1
            self.stats.reused += 1
            cnx = stack.pop()
            if not stack:
                del self._idle[key]     # no empty stacks: the maintenance relies on it
            khash = cnx.pooled.khash
            if khash:
                self.budget.exchange.changed(khash, -1, 1)
            self._used[cnx] = holder
            return cnx
        if take and self.budget is not None and self.budget.exchange is not None and \
                self._count() < self._maxconn:
            exchange = self.budget.exchange
            khash = exchange.hash_of(key)
            if khash and ((exchange.parking is not None and exchange.parking.count(khash)) or
                          exchange.offered(khash)):
                self._opening += 1
                return _TAKE
        if self._exiting and self._count() >= self._maxconn:
            self._finish_exits_locked()
        budget = self.budget
        if self._count() < self._maxconn and (
                budget is None or budget.try_acquire(budget.priority(key_database(key), holder.thread))):
            self._opening += 1
            return _NEW
        victim = self._room_victim_locked()
        if victim is not None:      # full, but idle for another DSN: make room
            self.stats.closed_room += 1
            self._opening += 1
            return _Room(victim)
        if evict and self._count() < self._maxconn and budget is not None and \
                budget.exchange is not None and budget.exchange.parking is not None and \
                budget.exchange.parking.parked():
            self._opening += 1              # full: make room on a parked connection
            return _EVICT
        if self._count() < self._maxconn:   # room here, but the shared budget is full
            self._opening += 1
            return _BUDGET
        return None

    def _wait_locked(self, key, holder):
        timeout = self.settings.wait_timeout
        if timeout <= 0:
            self.stats.timeouts += 1
            raise self._timeout_error(0.0)
        waiter = _Waiter(key, holder, self._lock)
        self._waiters.append(waiter)
        self.stats.waits += 1
        self._hand_off_locked()
        deadline = waiter.since + timeout
        try:
            while waiter.grant is None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    self.stats.timeouts += 1
                    raise self._timeout_error(monotonic() - waiter.since)
                waiter.cond.wait(remaining)
        except BaseException:
            # Timed out, or interrupted (gevent.Timeout, KeyboardInterrupt):
            # leave the queue, and pass on a grant that arrived meanwhile.
            if waiter.grant is None:
                self._waiters.remove(waiter)
            else:
                self._release_grant_locked(waiter.grant)
            raise
        return waiter.grant

    def _release_grant_locked(self, grant):
        """Undo a grant its borrower will not use (interrupted while waiting)."""
        if grant is _NEW or grant is _BUDGET or type(grant) is _Room:
            self._opening -= 1
            if grant is _NEW and self.budget is not None:
                self.budget.release()
            if type(grant) is _Room and not grant.victim.closed:
                self._push_idle_locked(grant.victim)    # back where it was
        else:
            del self._used[grant]
            self._push_idle_locked(grant, in_use=-1)
        if self._waiters:
            self._hand_off_locked()

    def _hand_off_locked(self):
        """Give free slots to waiters, first come first served."""
        while self._waiters:
            waiter = self._waiters[0]
            grant = self._grant_locked(waiter.key, waiter.holder)
            if grant is None:
                return
            self._waiters.popleft()
            waiter.grant = grant
            waiter.cond.notify()

    def _room_victim_locked(self):
        """The idle connection to close to make room for another database: with the
        exchange, one of the database with the most idle connections instance-wide
        (the others stay available to every process), else the least recently used."""
        exchange = self.budget.exchange if self.budget is not None else None
        if exchange is None or len(self._idle) < 2:
            return self._least_recently_used_idle_locked()
        spare = exchange.idle_totals()
        stack = max(self._idle.values(), key=lambda st: (
            spare.get(st[0].pooled.khash, 0) if st[0].pooled.khash else 1 << 30,
            -st[0].pooled.last_used))
        victim = stack[0]
        self._remove_idle_locked(victim)
        return victim

    def _least_recently_used_idle_locked(self):
        oldest = None
        for stack in self._idle.values():
            if stack and (oldest is None or
                          stack[0].pooled.last_used < oldest.pooled.last_used):
                oldest = stack[0]
        if oldest is not None:
            self._remove_idle_locked(oldest)
        return oldest

    def _book_locked(self, cnx, holder):
        """``cnx`` is now in use by ``holder`` (published for the exchange's waits)."""
        self._used[cnx] = holder
        khash = cnx.pooled.khash
        if khash:
            self.budget.exchange.changed(khash, 0, 1)

    def _unbook_locked(self, cnx):
        """``cnx`` is no longer in use: its holder, or ``_MISSING`` if it was not."""
        holder = self._used.pop(cnx, _MISSING)
        khash = cnx.pooled.khash
        if holder is not _MISSING and khash:
            self.budget.exchange.changed(khash, 0, -1)
        return holder

    def _push_idle_locked(self, cnx, in_use=0):
        """``cnx`` is idle now (``in_use`` = -1: it was in use)."""
        record = cnx.pooled
        record.last_used = monotonic()
        stack = self._idle.get(record.key)
        if stack is None:
            self._idle[record.key] = [cnx]
        else:
            stack.append(cnx)
        self._n_idle += 1
        if record.khash:
            self.budget.exchange.changed(record.khash, 1, in_use)

    def _remove_idle_locked(self, cnx, in_use=0):
        """``cnx`` is no longer idle (``in_use`` = 1: counted in use for the exchange)."""
        record = cnx.pooled
        stack = self._idle[record.key]
        stack.remove(cnx)
        if not stack:
            del self._idle[record.key]
        self._n_idle -= 1
        if record.khash:
            self.budget.exchange.changed(record.khash, -1, in_use)

    def _send_off_locked(self, cnx):
        """``cnx`` (out of the books) leaves for another process (parked, lent): its slot
        stays counted here, in ``_closing``, while it travels; a ``close_all`` meanwhile
        (``_closings`` moved on) closes it if it comes back."""
        self._closing += 1
        cnx.pooled.lent_at = self._closings
        self._lent.add(cnx)     # in no book meanwhile: a child forked now neutralizes its copy

    def _retire(self, connections, shed=0):
        """Close connections already counted in ``_closing`` (lock not held).

        The caller does not wait for the backends to exit: their slots stay
        counted until EOF shows they did (checked here, by borrowers short of
        a slot, and by the maintenance tick), then are freed."""
        fds = begin_close(connections)
        deadline = monotonic() + EXIT_WAIT
        if fds and (self._waiters or (self.budget is not None and self.budget.waiting())):
            # Someone needs the slot: a short wait here hands it over sooner than
            # the next maintenance tick would.
            stop = monotonic() + HANDOVER_WAIT
            while fds and monotonic() < stop:
                for fd in exited(fds, stop - monotonic()):
                    fds.remove(fd)     # exited: its slot is freed below with the others
        watched = [[fd, deadline, 0, after_fork.identity(fd)] for fd in fds]
        with self._lock:
            # Slots without a socket to watch (closed already) are free now.
            self._exiting.extend(watched)
            for entry in self._exiting[len(self._exiting) - len(fds):][:shed]:
                entry[2] = 1            # a slot claimed for another process's waiter
            self._free_slots_locked(len(connections) - len(fds), max(shed - len(fds), 0))
            self._finish_exits_locked()

    def finish_exits(self):
        """Free the slots of closed connections whose backend has exited."""
        if self._exiting:
            with self._lock:
                self._finish_exits_locked()

    def _finish_exits_locked(self):
        if not self._exiting:
            return
        freed, shed = finished(self._exiting)
        if freed:
            self._free_slots_locked(freed, shed)

    def _free_slots_locked(self, count, shed=0):
        if not count:
            return
        self._closing -= count
        if self.budget is not None:
            self.budget.release(count, shed)
        if self._waiters:
            self._hand_off_locked()

    def _reclaim_used_locked(self):
        """Free the slots of in-use connections closed from outside or flagged ``leaked``."""
        freed = 0
        for cnx in [c for c in self._used if c.closed or getattr(c, 'leaked', False)]:
            self._unbook_locked(cnx)
            if cnx.closed:
                _logger.debug('%r: dropped a connection closed while in use', self)
                if self.budget is not None:
                    self.budget.release()
            else:
                del cnx.leaked
                note_privileges(cnx)            # as give_back does
                self._push_idle_locked(cnx)
                self.stats.reclaimed_leaked += 1
                _logger.info('%r: Free leaked connection to %r', self,
                             key_database(cnx.pooled.key))
            freed += 1
        return freed

    # ------------------------------------------------------------------ network
    def _open(self, connection_info, key, holder):
        """Connect in a slot already reserved (``_opening``); give it back on failure.
        Through an outage of the server, waits for it until ``db_pool_wait_timeout`` after
        the borrow began (see :mod:`.outage`); a replica's failure is the router's to handle."""
        direct = self._direct_info(connection_info, key)
        info = direct or connection_info
        outages = self._outages or self._init_outages()
        server = server_of(info)
        replica = self.router is not None and server in self.router.replica_names
        try:
            if replica:
                cnx = psycopg2.connect(connection_factory=self.connection_factory, **info)
            else:
                cnx = outages.connect(
                    lambda: psycopg2.connect(connection_factory=self.connection_factory, **info),
                    server, holder.since + self.settings.wait_timeout,
                    self.settings.wait_timeout)
        except BaseException as exc:
            with self._lock:
                self._opening -= 1
                if self.budget is not None:
                    self.budget.release()
                if self._waiters:
                    self._hand_off_locked()
            explained = (explain_failure(exc, info)
                         if isinstance(exc, psycopg2.OperationalError) and
                         not isinstance(exc, OutageTimeout) else None)
            if explained:
                _logger.warning('%s', explained)
                raise psycopg2.OperationalError(explained) from exc
            _logger.info('Connection to the database failed')
            raise
        self.prepare_connection(cnx, key)
        record = cnx.pooled
        if not replica:             # (a replica has no outage row: the router bans it)
            record.gen_cells = outages.cells
            record.gen_cell, record.gen = outages.generation(server)
        record.direct = (direct is not None) if self.settings.direct_host else None
        record.prefix = self._prefix(cnx, key, holder)
        record_tls(cnx, info)
        with self._lock:
            self._opening -= 1
            self._book_locked(cnx, holder)
            self.stats.opened += 1
        return cnx

    def _take(self, key, holder, connection_info=None):
        """Take an idle connection to ``key`` from another process (a local slot is
        reserved): it keeps the donor's age and lifetime. None if none came."""
        got = None
        claim = []      # what we hold, whatever is raised: [cnx, meta, ours, fd] (see exchange)
        exchange = self.budget.exchange
        try:
            khash = exchange.hash_of(key)
            got = self._unpark(exchange, khash, key, claim)
            parked = got is not None
            if got is None:
                got = exchange.take(khash, key, self.connection_factory, claim)
            if got is None:
                return None
            cnx, meta = got
            self.prepare_connection(cnx, key)
            record = cnx.pooled
            record.born, record.expires, record.reuses, record.pid = \
                meta['born'], meta['expires'], meta['reuses'], meta['pid']
            record.params = meta['params']
            # The session's name, and its start-up name (a shell's libpq knows neither).
            record.app = meta['app']
            record.app0 = meta.get('app0', meta['app'])
            record.name_tx = False
            record.gen_cell, record.gen = meta.get('gen') or (None, 0)
            record.gen_cells = (self._outages or self._init_outages()).cells
            if opened_before_restart(cnx):
                with self._lock:                # closed with its slot, the caller opens one
                    self._closing += 1
                self._retire([cnx])
                return None
            record.cancel_info = connection_info   # for its cancel() (a shell's libpq cannot)
            record.direct = False if self.settings.direct_host else None
            record.prefix = self._prefix(cnx, key, holder)
        except BaseException:       # gevent.Timeout, Odoo's SIGXCPU: nothing may leak
            ours = claim[0] if claim and claim[2] and claim[0] is not None else None
            with self._lock:
                self._opening -= 1
                if ours is not None:
                    self._closing += 1      # ours with its slot: closed like any other
                if self._waiters:
                    self._hand_off_locked()
            if ours is not None:
                self._retire([ours])
            elif claim and claim[2] and len(claim) > 3:
                exchange.parking.retire(claim[3])   # received, not wrapped: slot ours
            raise
        with self._lock:
            self._opening -= 1
            self._book_locked(cnx, holder)
            if parked:
                self.stats.unparked += 1
            else:
                self.stats.taken += 1
        return cnx

    def _evict_parked(self):
        """Close a parked connection of the database with the most parked (spare ones),
        waiting for its backend to exit: its budget slot is ours. False if none."""
        parking = self.budget.exchange.parking
        got = parking.unpark_spare()
        if got is None:
            return False
        try:
            parking.close_and_wait(got[0])
        except BaseException:
            self.budget.release()   # the slot came with it (its backend is on its way out)
            raise
        with self._lock:
            self.stats.closed_room += 1
        return True

    def _unpark(self, exchange, khash, key, claim):
        """(connection, bookkeeping) of ``khash`` from the parking, its budget slot now
        ours; None if none is parked. Dead and expired ones are closed on the way.
        ``claim`` says what we hold if anything is raised (see :meth:`_take`)."""
        parking = exchange.parking
        if parking is None or not khash:
            return None
        while True:
            got = parking.unpark(khash, claim)      # claim: [None, meta, True, fd]
            if got is None:
                parking.want(khash)
                return None
            fd, meta, parker, _parked_at = got
            if parker != self.budget.pid:
                parking.want(khash)     # connections of this database move: keep parking
            if (meta['expires'] and meta['expires'] <= monotonic()) or fd_readable(fd):
                parking.retire(fd)      # expired, or the server said goodbye
                del claim[:]            # (after: until retired, the claim says so)
                continue
            try:
                cnx = exchange.wrap(fd, meta, key, self.connection_factory, khash)
            except Exception as exc:    # noqa: BLE001 - the stand-in failed: open one
                _logger.info('db_pooling: could not take a parked connection (%s); opening '
                             'one', exc)
                parking.retire(fd)
                del claim[:]
                return None
            claim[:] = [cnx, meta, True]    # the wrapped copy is ours now
            IN_FLIGHT.pop(fd, None)
            os.close(fd)
            if faults.plan:
                faults.hit('parking.receive.after_wrap')
            return cnx, meta

    def lend_idle(self, khash):
        """For another process: our most recently used idle connection of ``khash`` if it
        can move (see :func:`.exchange.offerable`), out of the books until :meth:`lent`.
        Not with ``db_pool_reset = always``: the taker would skip the reset it promises."""
        if self.settings.reset != 'smart' or self._closed:
            return None
        with self._lock:
            for stack in self._idle.values():
                if stack[0].pooled.khash != khash:
                    continue
                cnx = stack[-1]
                record = cnx.pooled
                if record.dirty or (record.expires and record.expires < monotonic() + 5) \
                        or not offerable(cnx) or socket_readable(cnx):
                    return None
                self._remove_idle_locked(cnx)
                self._send_off_locked(cnx)
                return cnx
        return None

    def lent(self, cnx, given):
        """End of a :meth:`lend_idle`: ``given`` (the taker has the session and its budget
        slot: drop our copy without ending the session), else back to idle (closed if
        ``close_all`` ran meanwhile)."""
        if given:
            self.budget.exchange.keep_shell(cnx)
        with self._lock:
            record = cnx.pooled
            if not given and (self._closed or self._closings != record.lent_at):
                doomed = [cnx]          # still counted in _closing
            else:
                doomed = []
                self._closing -= 1
                if given:
                    self.stats.given += 1
                else:
                    last_used = record.last_used
                    self._push_idle_locked(cnx)
                    record.last_used = last_used
                self._lent.discard(cnx)     # in a book again, or given
                if self._waiters:
                    self._hand_off_locked()
        if doomed:
            try:
                self._retire(doomed)
            finally:
                self._lent.discard(cnx)     # closed

    def prepare_connection(self, cnx, key):
        """Fill in the record (``cnx.pooled``) of a new connection for ``key``."""
        now = monotonic()
        lifetime = self.settings.max_lifetime
        record = ensure_record(cnx)             # (adopted from Odoo's stock pool: none yet)
        record.key = key
        record.pool = self
        record.born = record.last_used = now
        # Up to 10% jitter so that connections opened together do not all
        # recycle together.
        record.expires = now + lifetime * (1 - 0.1 * random.random()) if lifetime else 0
        record.reuses = 0
        info = cnx.info                         # (a new object at each access)
        record.pid = info.backend_pid           # a taken one's libpq may say another's
        # Its name now and at start-up (a taken one's: from the donor, see _take).
        record.app = record.app0 = info.parameter_status('application_name') or ''
        record.tracked = track(cnx)
        exchange = self.budget.exchange if self.budget is not None else None
        # Offered to other processes when idle: plain connections of ordinary databases.
        record.khash = exchange.hash_of(key) if exchange is not None and record.tracked \
            and not cnx.closed and not info.ssl_in_use and not gss_in_use(cnx) else 0

    def adopt(self, cnx, key, in_use):
        """Take over a connection of Odoo's stock pool this one replaces (no other
        thread sees this pool yet): in use by an unknown holder, or idle."""
        self.prepare_connection(cnx, key)
        with self._lock:
            if in_use:
                self._book_locked(cnx, Holder(None))
            else:
                self._push_idle_locked(cnx)

    def _direct_info(self, connection_info, key):
        """connection_info for PostgreSQL itself (db_direct_host/port) when this
        connection needs a real session: those to the long-lived databases
        (``postgres``: the bus and cron LISTEN). None: connect as asked."""
        settings = self.settings
        if not settings.direct_host or key_database(key) not in LONG_LIVED_DATABASES:
            return None
        direct = dict(connection_info, host=settings.direct_host, **DIRECT_KEEPALIVES)
        if settings.direct_port:
            direct['port'] = settings.direct_port
        return direct

    def _prefix(self, cnx, key, holder):
        """``cnx.pooled.prefix`` of a borrow: the role's timeouts, after ``SET
        application_name`` when the session does not have this process's name for
        ``key`` (taken from another process, reset): see session_tracking."""
        record = cnx.pooled
        prefix = self._timeouts_prefix(key, holder)
        app = self._app_names.get(key)
        if app is None:
            app = self._app_names[key] = dict(key).get('application_name') or ''
        if not app or record.app == app:
            record.name = record.name_sql = None
            return prefix
        record.name = app
        # Quoted for this connection's standard_conforming_strings (a database may set it).
        quoting = (app, cnx.info.parameter_status('standard_conforming_strings'))
        name_sql = self._name_sqls.get(quoting)
        if name_sql is None:
            name_sql = self._name_sqls[quoting] = psycopg2.sql.SQL(
                'SET application_name = {}; ').format(psycopg2.sql.Literal(app)).as_string(cnx)
        record.name_sql = name_sql
        return name_sql + prefix

    def _timeouts_prefix(self, key, holder):
        """The SET LOCAL statements of the borrower's role (http or cron), sent
        with the first statement of each transaction; '' when none is set."""
        if key_database(key) in LONG_LIVED_DATABASES:
            return ''
        settings, prefixes = self._prefixes
        if settings is not self.settings:       # hashing Settings costs more than this
            settings = self.settings
            prefixes = {role: settings.timeouts_prefix(role) for role in ('http', 'cron')}
            self._prefixes = settings, prefixes
        budget = self.budget
        cron = holder.thread.startswith('odoo.service.cron') or (
            budget is not None and budget.role == 'cron')
        return prefixes['cron' if cron else 'http']

    def _wait_for_budget(self, key, holder):
        """Wait for a slot of the shared budget (a local slot is already reserved): None
        once taken, or the connection to ``key`` another thread gave back meanwhile
        (already booked in use, see :meth:`_hand_over_locked`)."""
        budget = self.budget
        self.stats.budget_waits += 1
        wait = _BudgetWait(key, holder)
        with self._lock:
            self._budget_waits.setdefault(key, collections.deque()).append(wait)
        started, taken, interrupted = monotonic(), False, False
        try:
            taken = budget.acquire(budget.priority(key_database(key), holder.thread),
                                   self.settings.wait_timeout, wake=wait.event)
        except BaseException:       # gevent.Timeout, KeyboardInterrupt
            interrupted = True
            raise
        finally:
            with self._lock:
                waits = self._budget_waits.get(key)
                if waits and wait in waits:
                    waits.remove(wait)
                    if not waits:
                        del self._budget_waits[key]
                if wait.cnx is not None and interrupted:
                    self._release_grant_locked(wait.cnx)    # back to idle
                elif wait.cnx is None and not taken:
                    self._opening -= 1
                    if self._waiters:
                        self._hand_off_locked()
        if wait.cnx is not None:
            if taken:
                budget.release()    # granted in the same instant: the slot is not needed
            return wait.cnx
        if not taken:
            self.stats.budget_timeouts += 1
            raise PoolTimeout(
                f'The Connection Pool Is Full: the instance-wide budget of {budget.budget} '
                f'server connections (db_pool_max_connections) stayed in use for '
                f'{monotonic() - started:.1f} s (db_pool_wait_timeout = '
                f'{self.settings.wait_timeout:g}). Held by: {budget.describe_holders()}. '
                f'Raise db_pool_max_connections if the server allows it, or look for long '
                f'transactions in the processes above.')

    def _revive(self, cnx):
        """Make an idle connection ready for a new borrower; False if it is dead."""
        try:
            if is_dead(cnx):
                raise psycopg2.OperationalError('closed by the server while idle')
            if opened_before_restart(cnx):
                raise psycopg2.OperationalError('opened before its server restarted')
            self._reset(cnx)
        except psycopg2.Error as exc:
            _logger.info('%r: replacing a dead idle connection to %r (%s)', self,
                         key_database(cnx.pooled.key), str(exc).strip().splitlines()[0])
            return False
        return True

    def _reset(self, cnx):
        """Clear what the previous borrower left in the session.

        ``always``: psycopg2's reset() as stock Odoo (ABORT if needed, DISCARD
        ALL: a round trip every reuse). ``smart``: nothing for a clean
        connection, the narrowest statements for the kinds its cursors saw, the
        full reset for what only it clears, every ``db_pool_reset_every``
        reuses, and when idle past ``db_pool_check_after`` (then it is also the
        liveness check). A transaction left open is rolled back in all cases.
        """
        settings = self.settings
        record = cnx.pooled
        dirty = record.dirty
        record.reuses += 1
        if settings.reset != 'smart' or dirty & session_state.FULL or not record.tracked:
            outcome = 'reset_full'
        elif settings.reset_every and record.reuses % settings.reset_every == 0:
            outcome = 'reset_every'
        elif not dirty and settings.check_after and \
                monotonic() - record.last_used > settings.check_after:
            outcome = 'reset_checked'
        else:
            outcome = 'reset_narrow' if dirty else 'reset_skipped'
        rolled_back = False
        if outcome in ('reset_narrow', 'reset_skipped'):
            if cnx.status != psycopg2.extensions.STATUS_READY or \
                    cnx.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                cnx.rollback()
                rolled_back = True
            narrow = session_state.narrow_reset(dirty)
            if narrow:
                run_reset(cnx, narrow)
                if dirty & session_state.SET:
                    record.app = record.app0    # RESET ALL: the start-up name
            else:
                restore_characteristics(cnx)
        else:
            cnx.reset()             # ABORT (in a transaction) + DISCARD ALL
            record.params = None
            record.app = record.app0            # (the borrow names it again)
            record.name_tx = False
        record.dirty = 0
        stats = self.stats
        with self._lock:
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            stats.reset_rollback += rolled_back
            if dirty:
                for name, bit in session_state.KINDS.items():
                    if dirty & bit:
                        setattr(stats, 'dirty_' + name, getattr(stats, 'dirty_' + name) + 1)

    # ------------------------------------------------------------------ maintenance
    def maintain(self):
        """One maintenance pass (the timer calls this every ``timer_period``)."""
        settings = self.settings
        now = monotonic()
        with self._lock:
            doomed = self._evict_idle_locked(now, settings)
            self._closing += len(doomed)
            self._reclaim_used_locked()
            if settings.leak_warn_after:
                self._warn_leaks_locked(now, settings.leak_warn_after)
            if self._waiters:
                self._hand_off_locked()
        if doomed:
            self._retire(doomed)

    def shed_idle(self):
        """While borrowers wait for the shared budget, close idle connections,
        least recently used first (the maintenance thread calls this often)."""
        if self.budget is None or not self.budget.waiting() or not self._n_idle:
            return 0
        with self._lock:
            if self._waiters:
                return 0
            doomed, shed = self._claim_shed_locked(self._n_idle)
            self._closing += len(doomed)
        if doomed:
            self._retire(doomed, shed)
        return len(doomed)

    def _claim_shed_locked(self, most):
        """Take out of the books up to ``most`` LRU idle connections that the
        budget's waiters need (never more than other processes leave to close)."""
        shed = self.budget.claim_shed(min(most, self._n_idle))
        doomed = [self._least_recently_used_idle_locked() for _ in range(shed)]
        self.stats.shed += shed
        return doomed, shed

    def _evict_idle_locked(self, now, settings):
        """Take out of the books the idle connections that must go; returns them."""
        idle_deadline = now - settings.idle_timeout if settings.idle_timeout else None
        doomed, timed_out = [], []
        for stack in sorted(self._idle.values(), key=lambda st: st[0].pooled.last_used):
            for cnx in list(stack):
                if is_dead(cnx) or opened_before_restart(cnx):
                    reason = 'closed_dead'
                elif cnx.pooled.expires and cnx.pooled.expires <= now:
                    reason = 'closed_lifetime'
                elif idle_deadline is not None and cnx.pooled.last_used <= idle_deadline:
                    timed_out.append(cnx)     # least recently used first
                    continue
                else:
                    continue
                self._remove_idle_locked(cnx)
                doomed.append(cnx)
                setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        if timed_out and self.budget is not None:
            # min_idle connections stay open instance-wide: ask the shared state
            # how many of ours may go, so that two processes never both close
            # the last ones.
            timed_out = timed_out[:self.budget.claim_idle_eviction(len(timed_out))]
        for cnx in timed_out:
            self._remove_idle_locked(cnx)
            doomed.append(cnx)
            self.stats.closed_idle += 1
        return doomed

    def _warn_leaks_locked(self, now, limit):
        for cnx, holder in self._used.items():
            if not holder.warned and now - holder.since >= limit:
                holder.warned = True
                self.stats.leak_warnings += 1
                _logger.warning(
                    '%r: a connection has been borrowed for more than %d s '
                    '(db_pool_leak_warn_after): %s. A cursor held this long is usually '
                    'a cursor that was never closed.', self, limit, holder.describe(cnx, now))

    def _timeout_error(self, waited):
        now = monotonic()
        holders = sorted(self._used.items(), key=lambda item: item[1].since)[:5]
        listed = '; '.join(f'[{i}] {h.describe(c, now)}' for i, (c, h) in enumerate(holders, 1))
        return PoolTimeout(
            f'The Connection Pool Is Full: all {self._maxconn} connections of this pool are in use '
            f'(db_maxconn = {self._maxconn}) and none was freed after waiting {waited:.1f} s '
            f'(db_pool_wait_timeout = {self.settings.wait_timeout:g}). '
            f'Oldest holders: {listed or "none"}. If these holders are legitimate, raise '
            f'db_maxconn or db_pool_wait_timeout; if one holds a cursor it never closes, fix '
            f'the code at its borrow site.')

    # ------------------------------------------------------------------ introspection
    def snapshot(self):
        """Plain data about this pool, for the dashboard, the CLI and tests."""
        now = monotonic()
        with self._lock:
            return {
                'readonly': self._readonly,
                'maxconn': self._maxconn,
                'in_use': len(self._used),
                'idle': self._n_idle,
                'opening': self._opening,
                'closing': self._closing,
                'waiting': len(self._waiters),
                'holders': [
                    {'database': key_database(c.pooled.key), 'age': now - h.since,
                     'site': format_site(h.site), 'thread': h.thread, 'url': h.url}
                    for c, h in sorted(self._used.items(), key=lambda item: item[1].since)],
                'stats': self.stats.as_dict(),
            }

    def longest_borrow(self):
        """(wall-clock start, database, site) of the oldest current borrow, or None."""
        with self._lock:
            if not self._used:
                return None
            cnx, holder = min(self._used.items(), key=lambda item: item[1].since)
            return holder.wall_since, key_database(cnx.pooled.key), format_site(holder.site)

    def figures(self):
        """Cheap counts for the shared state: in use (long-lived ones apart, being opened
        included), idle. A borrower waiting for the budget is not in use: its local slot
        (in ``_opening``) has no slot of the budget yet, so it would show more in use than
        the process holds."""
        with self._lock:
            long_lived = sum(1 for cnx in self._used
                             if key_database(cnx.pooled.key) in LONG_LIVED_DATABASES)
            waiting = sum(map(len, self._budget_waits.values())) if self._budget_waits else 0
            return {'in_use': len(self._used) - long_lived + self._opening - waiting,
                    'idle': self._n_idle, 'long_lived': long_lived}

    def shutdown(self):
        """Close every connection and stop maintaining this pool."""
        self._closed = True
        self.close_all()

    def _forget_after_fork(self):
        """In a forked child: drop the parent's connections and start afresh.

        The child shares the parent's sockets; closing them here (or letting
        the garbage collector do it) would send Terminate and end the parent's
        sessions. Pointing the child's copy of each socket at /dev/null first
        makes that close harmless."""
        inherited = list(self._used) + list(self._lent)
        for stack in self._idle.values():
            inherited.extend(stack)
        exiting = self._exiting
        # A fresh state first: whatever fails below leaves no book of the parent's here.
        self._lock = threading.Lock()
        self._lent = set()
        self._idle, self._n_idle, self._used = {}, 0, {}
        self._opening = self._closing = 0
        self._exiting = []
        self._waiters = collections.deque()
        self._budget_waits = {}
        self._handed_in_row = 0
        self._timer = None
        for cnx in inherited:
            try:
                neutralize(cnx)
            except Exception:       # noqa: BLE001 - one that cannot be pointed away stays
                _logger.debug('db_pooling: an inherited connection could not be '
                              'neutralized in a forked child', exc_info=True)
        for entry in exiting:
            after_fork.close_inherited(entry[0], entry[3])


def fd_readable(fd):
    """True when the server sent something to an idle socket: usually its goodbye
    (shutdown, pg_terminate_backend) or a dropped socket. No round trip."""
    try:
        poller = select.poll()          # (see backend_exit.readable: not select())
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def socket_readable(cnx):
    """:func:`fd_readable` of an idle connection (True if it has no socket)."""
    try:
        fd = cnx.fileno()
    except psycopg2.Error:
        return True
    return fd_readable(fd)


def is_dead(cnx):
    """Whether an idle connection is known dead, without a round trip.

    The server's goodbye arrives as an error message and then EOF: the first
    ``poll()`` consumes the message (libpq files a FATAL one among the notices,
    which is enough: the EOF may not be there yet), the next one hits EOF and
    raises."""
    try:
        for _ in range(4):
            if cnx.closed:
                return True
            if not socket_readable(cnx):
                return False
            cnx.poll()
            if cnx.notices and cnx.notices[-1].startswith('FATAL'):
                return True
    except psycopg2.Error:
        return True
    return bool(cnx.closed)


def begin_close(connections):
    """Close connections; return duplicates of their sockets to watch for the exit.

    ``close()`` only sends Terminate; the backend leaves pg_stat_activity a
    moment later. The server closes its socket only after that, so EOF on a
    duplicate of our socket means "gone from the server": a slot freed then
    can be reused without the server ever seeing one connection too many.
    """
    fds = []
    for cnx in connections:
        if not cnx.closed:
            try:
                fds.append(os.dup(cnx.fileno()))
            except (OSError, psycopg2.Error):
                pass
            try:
                cnx.close()
            except Exception:       # pragma: no cover - close is best effort
                _logger.debug('error while closing a connection', exc_info=True)
    return fds


def close_and_wait(connections, timeout=2.0):
    """Close connections and wait (up to ``timeout``) until their backends have exited."""
    wait_exited(begin_close(connections), timeout)


# Pools of this process, to reset in a forked child.
_live_pools = weakref.WeakSet()


def _after_fork_in_child():
    after_fork.each(_live_pools, ConnectionPool._forget_after_fork)


after_fork.register('pool', _after_fork_in_child)
