"""The per-process connection pool: a drop-in replacement for Odoo's ``ConnectionPool``.

Locks, in the order they may be taken: each entry says what may be taken while holding
that lock, and none is taken while holding one listed after it (test_lock_naming.py
checks this order and the names below on the source)::

    pool lock       pool.books.lock, one per pool (its waiters' Conditions share it):
                    the books (idle, used, lent, opening, closing, exiting, waiters),
                    sharing.budget_waits, stats. Taken with no lock held, never twice
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
a name ending in ``_locked`` the lock of the object it is called on (the pool lock for
the pool and its parts, the exchange lock in exchange.py), in ``_shared_locked`` the
shared lock (budget, parking, shared_state: they take the mapped ``cells``), in
``_exit_locked`` the exit lock.

State machine of one connection: its record's ``state`` (OUT, IN_USE, IDLE, PARKING,
LENDING, CLOSING), moved by one function under the pool lock (``books.move_locked``), which also
keeps the books and slot counts and publishes the move to the exchange: the table and
the transitions are at the top of :mod:`.slots`.

A *slot* is counted for every connection in use, idle, travelling, closing or being
opened; there are never more than ``maxconn`` slots. When none is free a borrower waits
in a FIFO queue. A freed slot is handed directly to the head of the queue (as the
idle connection itself when its DSN matches, otherwise as the right to open a
new one after closing the idle connection), so a newcomer can never overtake
a waiter. With the shared budget, a connection given back goes first to a
thread of this process waiting in the budget's queue for the same database
(a bounded number of times in a row, see ``Sharing.hand_over_locked``).

The pool (this module: the Odoo-facing API, borrow, give_back, close_all; shutdown and a
forked child's reset) drives four parts, one object and one module each, which it
creates and which know it (``pool``) and its books:

    pool.books      :class:`.slots.Books`: the pool lock, the books and slot accounting
                    (grants, the FIFO of waiters, each move of a connection)
    pool.sessions   :class:`.sessions.SessionSteps`: opening, preparing and resetting
                    server sessions
    pool.sharing    :class:`.sharing.Sharing`: connections moving between processes
                    (parking, taking, lending, budget waits)
    pool.upkeep     :class:`.upkeep.Upkeep`: maintenance passes and figures

They call each other's public methods only; the settings, budget, router and stats are
the pool's (the installer sets the first three on the class). The connection's own
record is :mod:`..sessions.conn_record`.

Network round trips (connect, reset, health check) are never made while
holding the lock. Idle eviction, max lifetime, dead-socket detection, leaked
connection recovery and the leak warning run on a maintenance thread (see
:mod:`.maintenance`), so they happen even when nobody borrows.
"""
import logging
import time
import weakref

import psycopg2.extensions

from .. import after_fork
from ..config.options import Settings
from ..dsn import dsn_key, key_database, dsn_equals
from ..errors import PoolError
from ..sessions import session_state
from ..sessions.session_tracking import SessionTracking, note_privileges
from ..shared.backend_exit import close_and_wait
from ..shared.exchange import neutralize
from ..shared.outage import outages_for, server_of
from . import maintenance
from .borrowers import Holder, borrow_site
from .sessions import SessionSteps
from .sharing import Sharing
from .slots import (BUDGET, CLOSING, EVICT, IDLE, IN_USE, MISSING, NEW, OUT, PARKING, TAKE,
                    Books, Grant)
from .upkeep import PoolStats, Upkeep

# Under odoo.sql_db so Odoo's PostgreSQL log handler (log_db) never logs our
# own messages through a pooled connection.
_logger = logging.getLogger('odoo.sql_db.pool')

monotonic = time.monotonic


class PooledConnection(SessionTracking, psycopg2.extensions.connection):
    """Default connection class outside Odoo (the installer uses Odoo's
    ``PsycoConnection`` with the same mixin). A Python subclass is needed: the
    pool keeps its record of the connection in it (``cnx.pooled``, see conn_record)."""


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
        self._readonly = bool(readonly)
        if settings is not None:
            self.settings = settings
        if connection_factory is not None:
            self.connection_factory = connection_factory
        if timer_period is not None:
            self.timer_period = timer_period
        if budget is not None:
            self.budget = budget
        self.stats = PoolStats()
        self.books = Books(self, max(int(maxconn), 1))     # its lock is the pool lock
        self.sessions = SessionSteps(self)
        self.sharing = Sharing(self)
        self.upkeep = Upkeep(self)
        self._timer = None
        self._closed = False
        _live_pools.add(self)

    # ------------------------------------------------------------------ Odoo's API
    @property
    def readonly(self):
        return self._readonly

    def __repr__(self):
        mode = 'read-only' if self._readonly else 'read/write'
        books = self.books
        return (f"ConnectionPool({mode};used={len(books.used)}/"
                f"count={books.count()}/max={books.maxconn})")

    @property
    def closed(self):
        """Whether :meth:`shutdown` ran."""
        return self._closed

    def exits_pending(self):
        """Whether slots of closed connections wait for their backend to exit (lock-free)."""
        return bool(self.books.exiting)

    def holds_idle(self, key=None):
        """Whether an idle connection for DSN key ``key`` (any, if None) is here (a
        lock-free estimate)."""
        return bool(self.books.idle) if key is None else key in self.books.idle

    def has_room(self):
        """Whether a new connection could be opened now without closing another
        (a lock-free estimate, for the replica choice)."""
        return self.books.count() < self.books.maxconn and (
            self.budget is None or self.budget.has_room())

    def borrowed_for(self, connection):
        """Seconds since ``connection`` was borrowed from this pool; None if it is not
        in use here."""
        holder = self.books.used.get(connection)
        return None if holder is None else monotonic() - holder.since

    def snapshot(self):
        """Plain data about this pool, for the dashboard, the CLI and tests."""
        return self.upkeep.snapshot()

    def maintain(self):
        """One maintenance pass now (the maintenance thread runs them every
        ``timer_period``)."""
        self.upkeep.maintain()

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
        reset as ``db_pool_reset`` says (see :meth:`.sessions.SessionSteps.revive`) and one
        found dead is replaced transparently. Raises :class:`~.errors.PoolTimeout` (a ``PoolError``)
        after ``db_pool_wait_timeout`` seconds without a free slot.
        """
        key = dsn_key(connection_info)
        holder = Holder(borrow_site())
        budget = self.budget
        books = self.books
        outages = self._outages or self.outages()
        if outages.cells[outages.flag] and key not in books.idle:
            self._await_server(outages, connection_info, key, holder)
        if budget is not None and budget.exchange is not None and key not in books.idle:
            self.sharing.await_in_use(budget.exchange, key)
        with books.lock:
            if self._timer is None:
                self._timer = maintenance.start(self)
                if budget is not None and budget.exchange is not None:
                    budget.exchange.add_pool(self)
            self.stats.borrows += 1
            grant = books.acquire_locked(key, holder, take=True)
        if grant is TAKE:
            cnx = self.sharing.take(key, holder, connection_info)
            if cnx is not None:
                return cnx
            with books.lock:
                books.opening -= 1
                grant = books.acquire_locked(key, holder)
        if grant is EVICT:
            evicted = False
            try:
                evicted = self.sharing.evict_parked()
            finally:                # also on gevent.Timeout, Odoo's SIGXCPU: the local slot back
                if not evicted:
                    with books.lock:
                        books.opening -= 1
                        if books.waiters:
                            books.hand_off_locked()
            if evicted:
                grant = NEW
            else:
                with books.lock:
                    grant = books.acquire_locked(key, holder, evict=False)
        if grant.__class__ is Grant and budget is not None and budget.exchange is not None \
                and budget.exchange.parking is not None:     # NEW, BUDGET or a room
            khash = budget.exchange.hash_of(key)
            if khash:
                budget.exchange.parking.want(khash)     # not held here: park it elsewhere
        if grant is NEW:
            return self.sessions.open_in_slot(connection_info, key, holder)
        if grant is BUDGET:
            grant = self.sharing.wait_for_budget(key, holder)
            if grant is None:
                return self.sessions.open_in_slot(connection_info, key, holder)
        try:
            if grant.__class__ is Grant:    # a room: make it
                close_and_wait((grant.victim,))
                grant = NEW
            elif self.sessions.revive(grant):
                grant.pooled.prefix = self.sessions.prefix(grant, key, holder)
                return grant
            else:
                with books.lock:
                    taken = grant.pooled.state != IN_USE
                    if not taken:   # dead: open a new one in its slot
                        books.move_locked(grant, OUT)
                        books.opening += 1
                        self.stats.dead_replaced += 1
                if not taken:
                    dead, grant = grant, NEW
                    close_and_wait((dead,), timeout=0.5)
        except BaseException:
            with books.lock:
                books.release_grant_locked(grant)
            raise
        if grant is not NEW:
            # close_all() or the reclaim of connections closed from outside took it, with
            # its slot, while it was checked: borrow again.
            return self.borrow_exact(connection_info)
        return self.sessions.open_in_slot(connection_info, key, holder)

    def outages(self):
        """The :class:`~.outage.Outages` of the budget's state (or of this process)."""
        if self._outages is None:
            self._outages = outages_for(self.budget)
        return self._outages

    def _await_server(self, outages, connection_info, key, holder):
        """A server of the instance is down: if it is ours and another process (or
        thread) probes it, wait for it here, without taking a slot (see outage)."""
        direct = self.sessions.direct_info(connection_info, key)
        server = server_of(direct or connection_info)
        if self.router is None or server not in self.router.replica_names:
            outages.await_up(server, holder.since + self.settings.wait_timeout,
                             self.settings.wait_timeout)

    def give_back(self, connection, keep_in_pool=True):
        """Return a borrowed connection; ``keep_in_pool=False`` closes it."""
        record = getattr(connection, 'pooled', None)      # (record_of, inlined: hot path)
        owner = self if record is None or record.pool is None else record.pool
        if owner is not self:       # lent by the read/write pool (replica routing)
            return owner.give_back(connection, keep_in_pool)
        books = self.books
        with books.lock:
            holder = books.used.get(connection, MISSING)
            if holder is MISSING:
                if connection.closed or (record is not None and (
                        record.state == CLOSING or
                        connection in books.idle.get(record.key, ()))):
                    # Closed by close_all() while in use (maybe still closing), or given
                    # back twice.
                    _logger.debug('%r: ignored give_back of a connection it no longer holds', self)
                    return
                raise PoolError('This connection does not belong to the pool')
            note_privileges(connection)         # (cheap: no round trip)
            if record.dirty & session_state.LOAD and keep_in_pool:
                keep_in_pool = False    # a loaded library cannot be unloaded
                self.stats.reset_closed += 1
            shed = 0
            if keep_in_pool and not connection.closed and not (
                    record.expires and record.expires <= monotonic()):
                sharing = self.sharing
                if sharing.budget_waits and sharing.hand_over_locked(connection):
                    return
                sharing.handed_in_row = 0
                if record.khash and not books.waiters and \
                        sharing.should_park_locked(connection) and sharing.park_now_locked(record):
                    books.move_locked(connection, PARKING)
                    doomed = None
                else:
                    books.move_locked(connection, IDLE)
                    if books.waiters:
                        books.hand_off_locked()
                    if self.budget is None or books.waiters or not self.budget.waiting():
                        return
                    # Another process waits for a slot of the shared budget and nobody
                    # here does: give up our least recently used idle connection.
                    doomed, shed = self.upkeep.claim_shed_locked(1)
                    if not doomed:
                        return
            else:
                books.move_locked(connection, CLOSING)
                doomed = [connection]
        if doomed is None:
            self.sharing.park(connection)
        else:
            books.retire(doomed, shed)

    def close_all(self, dsn=None):
        """Close every connection (in use ones too, as stock Odoo) or those of ``dsn``."""
        key = None if dsn is None else dsn_key(dsn)
        with self.books.lock:
            doomed = [cnx for cnx in self.books.used if key is None or cnx.pooled.key == key]
            for stack_key in [k for k in self.books.idle if key is None or k == key]:
                doomed.extend(self.books.idle[stack_key])
            for cnx in doomed:
                self.books.move_locked(cnx, CLOSING)
            self.books.closings += 1
        if doomed:
            self.books.retire(doomed)
            _logger.info('%r: Closed %d connections%s', self, len(doomed),
                         f' to {key_database(key)!r}' if key else '')
        exchange = self.budget.exchange if self.budget is not None else None
        if key is not None and exchange is not None and exchange.parking is not None:
            # Its database is being dropped or renamed: nothing of it may stay parked.
            khash = exchange.hash_of(key)
            if khash and exchange.parking.drain(khash):
                _logger.info('%r: Closed the parked connections to %r', self, key_database(key))

    # ------------------------------------------------------------------ end of life
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
        # A fresh state first: whatever fails below leaves no book of the parent's here.
        inherited, exiting = self.books.start_afresh()
        self.sharing.reset()
        self._timer = None
        for cnx in inherited:
            try:
                neutralize(cnx)
            except Exception:       # noqa: BLE001 - one that cannot be pointed away stays
                _logger.debug('db_pooling: an inherited connection could not be '
                              'neutralized in a forked child', exc_info=True)
        for entry in exiting:
            after_fork.close_inherited(entry[0], entry[3])


# Pools of this process, to reset in a forked child.
_live_pools = weakref.WeakSet()


def _after_fork_in_child():
    after_fork.each(_live_pools, ConnectionPool._forget_after_fork)


after_fork.register('pool', _after_fork_in_child)
