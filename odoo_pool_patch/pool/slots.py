"""Slots and books of the per-process pool: :class:`Books`, one per
:class:`.connection_pool.ConnectionPool`, holds its lock (the pool lock: see the lock order in
:mod:`.connection_pool`) and, under it, the books (its docstring lists them). A slot is
counted for every connection in use, idle, travelling or closing and for every connect
under way; never more than ``maxconn``.

Where a connection is, is its record's ``state`` (``cnx.pooled.state``), and one function
moves it, :meth:`Books.move_locked`: it updates the books and the slot counts and
publishes to the exchange what other processes see of this one (idle and in-use
connections per database), each state weighing as the table says::

    state     book               slot counted in   exchange: idle  in use
    OUT       none               (none)                      0       0
    IN_USE    used[cnx]=holder   len(used)                   0       1
    IDLE      idle[key]          n_idle                      1       0
    PARKING   lent               closing                     0       1
    LENDING   lent               closing                     0       0
    CLOSING   (lent if it was    closing                     0       0
              travelling)

    OUT --open, take, adopt--> IN_USE <--borrow / give_back--> IDLE
    IN_USE --give_back, another process wants it--> PARKING --parked--> OUT
    IDLE --end of a request (park_wanted)--> PARKING --could not go--> IDLE
    IDLE --lend_idle--> LENDING --given--> OUT, --refused--> IDLE
    IN_USE, IDLE, PARKING, LENDING --close--> CLOSING  (terminal: retire frees the slot
                                                        once the backend exited)
    IDLE --room for another database--> OUT  (its slot goes to the borrower's grant)
         OUT --that borrower interrupted--> IDLE
    IN_USE --closed from outside, dead at borrow--> OUT
    OUT --a taken one opened before a server restart, or a take interrupted--> CLOSING

A connection in use can be moved to CLOSING by ``close_all`` under its holder's feet (as
stock Odoo closes connections in use), or to OUT by the reclaim of connections closed
from outside: a borrower that finds its grant so while checking it borrows again (the
slot went with it), and a give-back of it is ignored.

A connection given back and on its way to the parking still counts in use for the
exchange (PARKING), one lent from idle does not (LENDING): a borrower elsewhere that
waits for a connection in use to come back (``pool.sharing.AWAIT_BUSY``) is told the truth
either way. A connection closing after a trip stays in ``lent`` until it is closed, so
that a child forked meanwhile neutralizes its copy too.

A grant says what a borrower got: an idle connection of its own (booked in use at once,
granted as itself), or a :class:`Grant`, a slot reserved here and what to do with it.
"""
import collections
import logging
import threading
import time

from .. import after_fork
from ..dsn import key_database
from ..errors import PoolError, PoolTimeout
from ..sessions.session_tracking import note_privileges
from ..shared.backend_exit import begin_close, exited, finished

_logger = logging.getLogger('odoo.sql_db.pool')
monotonic = time.monotonic

MISSING = object()      # (a connection in no book)

# Where a connection is (cnx.pooled.state): see the module's table.
OUT, IN_USE, IDLE, PARKING, LENDING, CLOSING = range(6)
STATES = ('out', 'in use', 'idle', 'parking', 'lending', 'closing')
_IDLE_WEIGHT = (0, 0, 1, 0, 0, 0)       # per state: counted idle for the exchange
_IN_USE_WEIGHT = (0, 1, 0, 1, 0, 0)     # counted in use
# (idle, in use) the exchange is told for a move [from][to]; None: nothing changes
_PUBLISH = tuple(tuple((_IDLE_WEIGHT[to] - _IDLE_WEIGHT[was],
                        _IN_USE_WEIGHT[to] - _IN_USE_WEIGHT[was])
                       if (_IDLE_WEIGHT[to], _IN_USE_WEIGHT[to]) !=
                       (_IDLE_WEIGHT[was], _IN_USE_WEIGHT[was]) else None
                       for to in range(6)) for was in range(6))
EXIT_WAIT = 2.0        # seconds a closed connection's slot waits for its backend to exit
HANDOVER_WAIT = 0.005  # seconds the closing thread waits for that when someone needs the slot


class Waiter:
    __slots__ = ('key', 'holder', 'cond', 'grant', 'since')

    def __init__(self, key, holder, lock):
        self.key = key
        self.holder = holder
        self.cond = threading.Condition(lock)
        self.grant = None
        self.since = monotonic()


class Grant:
    """A slot reserved in this pool for a borrower (counted in ``opening``), and what
    the borrower does with it, ``kind``:

    ``new``     open a connection in it (the shared budget's slot is taken too)
    ``budget``  take a slot of the shared budget first, then open
    ``take``    take another process's idle or parked connection into it
    ``evict``   close a parked connection (its budget slot becomes free), then open
    ``room``    close ``victim``, an idle connection here to another database (its slot
                is the one reserved), waiting for its backend to exit, then open

    The first four are the shared instances NEW, BUDGET, TAKE and EVICT; a ``room``
    grant is made per victim (:func:`room`). A borrower that reuses an idle connection
    of its own gets the connection itself: no grant is made on that path, the most
    frequent one."""
    __slots__ = ('kind', 'victim')

    def __init__(self, kind, victim=None):
        self.kind = kind
        self.victim = victim

    def __repr__(self):
        return f'<Grant {self.kind}>'


NEW, BUDGET, TAKE, EVICT = (Grant(kind) for kind in ('new', 'budget', 'take', 'evict'))


def room(victim):
    """The grant of the slot of ``victim``."""
    return Grant('room', victim)


class Books:
    """The books and slot accounting of one :class:`.connection_pool.ConnectionPool`
    (see the module): its lock, where each of its connections is, its slots and its
    waiters. The pool's collaborators (:mod:`.sessions`, :mod:`.sharing`, :mod:`.upkeep`)
    read and move connections only through it, under ``lock``.

    Attributes, all under ``lock`` (lock-free reads are estimates): ``idle`` (DSN key ->
    stack of idle connections, the last freed last), ``n_idle``, ``used`` (connection ->
    :class:`.borrowers.Holder`), ``lent`` (travelling), ``opening`` / ``closing`` (slots
    reserved for a connect / of connections travelling or closing), ``exiting`` ([dup fd,
    give-up deadline, shed, what the fd is open on] of closed connections whose backend
    has not exited yet), ``waiters`` (FIFO of :class:`Waiter`), ``closings`` (close_all()
    calls: a connection lent meanwhile is closed when it comes back), ``maxconn``."""

    def __init__(self, pool, maxconn):
        self.pool = pool            # for its budget, settings and stats (the installer sets them)
        self.maxconn = maxconn
        self.reset()

    def reset(self):
        """Empty books and a new lock."""
        self.lock = threading.Lock()
        self.idle = {}
        self.n_idle = 0
        self.used = {}
        self.lent = set()
        self.opening = 0
        self.closing = 0
        self.exiting = []
        self.waiters = collections.deque()
        self.closings = 0

    def start_afresh(self):
        """In a forked child: empty books and a new lock (close_all() calls kept); returns
        the parent's connections (to neutralize: see ``ConnectionPool``'s fork reset) and
        its ``exiting`` entries."""
        inherited = list(self.used) + list(self.lent)
        for stack in self.idle.values():
            inherited.extend(stack)
        exiting, closings = self.exiting, self.closings
        self.reset()
        self.closings = closings
        return inherited, exiting

    def count(self):
        return len(self.used) + self.n_idle + self.opening + self.closing

    def acquire_locked(self, key, holder, take=False, evict=True):
        """A reused idle connection (now in use), or a :class:`Grant`: NEW, BUDGET, a
        room, EVICT (if ``evict``) or, if ``take``, TAKE."""
        if not self.waiters:
            grant = self.grant_locked(key, holder, take, evict)
            if grant is None and self.reclaim_used_locked():
                grant = self.grant_locked(key, holder)
            if grant is not None:
                return grant
        return self._wait_locked(key, holder)

    def grant_locked(self, key, holder, take=False, evict=False):
        """Take a slot for ``key``: a reused idle connection (booked in use at
        once, so the slot is never counted free in between), or a :class:`Grant`:
        TAKE (if ``take`` and another process offers one), NEW, a room, EVICT (if
        ``evict`` and connections are parked) or BUDGET; None when there is no slot."""
        stack = self.idle.get(key)
        if stack:
            self.pool.stats.reused += 1
            cnx = stack[-1]
            self.move_locked(cnx, IN_USE, holder)
            return cnx
        budget = self.pool.budget
        if take and budget is not None and budget.exchange is not None and \
                self.count() < self.maxconn:
            exchange = budget.exchange
            khash = exchange.hash_of(key)
            if khash and ((exchange.parking is not None and exchange.parking.count(khash)) or
                          exchange.offered(khash)):
                self.opening += 1
                return TAKE
        if self.exiting and self.count() >= self.maxconn:
            self.finish_exits_locked()
        if self.count() < self.maxconn and (
                budget is None or
                budget.try_acquire(budget.priority(key_database(key), holder.thread))):
            self.opening += 1
            return NEW
        victim = self._room_victim_locked()
        if victim is not None:      # full, but idle for another DSN: make room
            self.pool.stats.closed_room += 1
            self.opening += 1
            return room(victim)
        if evict and self.count() < self.maxconn and budget is not None and \
                budget.exchange is not None and budget.exchange.parking is not None and \
                budget.exchange.parking.parked():
            self.opening += 1              # full: make room on a parked connection
            return EVICT
        if self.count() < self.maxconn:   # room here, but the shared budget is full
            self.opening += 1
            return BUDGET
        return None

    def _wait_locked(self, key, holder):
        timeout = self.pool.settings.wait_timeout
        if timeout <= 0:
            self.pool.stats.timeouts += 1
            raise self._timeout_error(0.0)
        waiter = Waiter(key, holder, self.lock)
        self.waiters.append(waiter)
        self.pool.stats.waits += 1
        self.hand_off_locked()
        deadline = waiter.since + timeout
        try:
            while waiter.grant is None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    self.pool.stats.timeouts += 1
                    raise self._timeout_error(monotonic() - waiter.since)
                waiter.cond.wait(remaining)
        except BaseException:
            # Timed out, or interrupted (gevent.Timeout, KeyboardInterrupt):
            # leave the queue, and pass on a grant that arrived meanwhile.
            if waiter.grant is None:
                self.waiters.remove(waiter)
            else:
                self.release_grant_locked(waiter.grant)
            raise
        return waiter.grant

    def release_grant_locked(self, grant):
        """Undo a grant its borrower will not use (interrupted while waiting)."""
        if grant.__class__ is Grant:
            self.opening -= 1
            if grant is NEW and self.pool.budget is not None:
                self.pool.budget.release()
            if grant.kind == 'room' and not grant.victim.closed:
                self.move_locked(grant.victim, IDLE)   # back where it was
        elif grant.pooled.state == IN_USE:     # (else close_all() took it: CLOSING)
            self.move_locked(grant, IDLE)
        if self.waiters:
            self.hand_off_locked()

    def hand_off_locked(self):
        """Give free slots to waiters, first come first served."""
        while self.waiters:
            waiter = self.waiters[0]
            grant = self.grant_locked(waiter.key, waiter.holder)
            if grant is None:
                return
            self.waiters.popleft()
            waiter.grant = grant
            waiter.cond.notify()

    def _room_victim_locked(self):
        """The idle connection to close to make room for another database: with the
        exchange, one of the database with the most idle connections instance-wide
        (the others stay available to every process), else the least recently used."""
        exchange = self.pool.budget.exchange if self.pool.budget is not None else None
        if exchange is None or len(self.idle) < 2:
            return self.least_recently_used_idle_locked()
        spare = exchange.idle_totals()
        stack = max(self.idle.values(), key=lambda st: (
            spare.get(st[0].pooled.khash, 0) if st[0].pooled.khash else 1 << 30,
            -st[0].pooled.last_used))
        victim = stack[0]
        self.move_locked(victim, OUT)      # its slot: the grant's
        return victim

    def least_recently_used_idle_locked(self, to=OUT):
        """The least recently used idle connection, moved ``to`` (OUT: its slot goes to
        a grant; CLOSING: it is closed); None if none is idle."""
        oldest = None
        for stack in self.idle.values():
            if stack and (oldest is None or
                          stack[0].pooled.last_used < oldest.pooled.last_used):
                oldest = stack[0]
        if oldest is not None:
            self.move_locked(oldest, to)
        return oldest

    def move_locked(self, cnx, to, holder=None):
        """Move ``cnx`` to state ``to`` (``holder``: who holds it, for IN_USE): the one
        place that changes a connection's books, slot counts and what the exchange
        publishes of it (see the module's table). IN_USE to IN_USE changes its holder."""
        record = cnx.pooled
        was = record.state
        if was == IN_USE:
            del self.used[cnx]
        elif was == IDLE:
            stack = self.idle[record.key]
            if stack[-1] is cnx:
                stack.pop()
            else:
                stack.remove(cnx)
            if not stack:
                del self.idle[record.key]     # no empty stacks: the maintenance relies on it
            self.n_idle -= 1
        elif was == PARKING or was == LENDING:
            self.closing -= 1
            if to != CLOSING:
                self.lent.discard(cnx)
        elif was == CLOSING:
            raise PoolError(f'{self.pool!r}: a closing connection cannot move to {STATES[to]}')
        if to == IN_USE:
            self.used[cnx] = holder
        elif to == IDLE:
            record.last_used = monotonic()
            stack = self.idle.get(record.key)
            if stack is None:
                self.idle[record.key] = [cnx]
            else:
                stack.append(cnx)
            self.n_idle += 1
        elif to == PARKING or to == LENDING:
            # Its slot stays counted here while it travels; a close_all() meanwhile
            # (closings moved on) closes it if it comes back; in no other book
            # meanwhile, a child forked now neutralizes its copy (lent).
            self.closing += 1
            record.lent_at = self.closings
            self.lent.add(cnx)
        elif to == CLOSING:
            self.closing += 1
        record.state = to
        if record.khash:
            counts = _PUBLISH[was][to]
            if counts is not None:
                self.pool.budget.exchange.changed(record.khash, *counts)

    def retire_sent_off(self, cnx):
        """Close a connection back from its trip after a ``close_all`` (CLOSING, in
        ``lent`` still); it leaves ``lent`` once closed."""
        try:
            self.retire([cnx])
        finally:
            self.lent.discard(cnx)

    def retire(self, connections, shed=0):
        """Close connections already counted in ``closing`` (lock not held).

        The caller does not wait for the backends to exit: their slots stay
        counted until EOF shows they did (checked here, by borrowers short of
        a slot, and by the maintenance tick), then are freed."""
        fds = begin_close(connections)
        deadline = monotonic() + EXIT_WAIT
        if fds and (self.waiters or (self.pool.budget is not None and self.pool.budget.waiting())):
            # Someone needs the slot: a short wait here hands it over sooner than
            # the next maintenance tick would.
            stop = monotonic() + HANDOVER_WAIT
            while fds and monotonic() < stop:
                for fd in exited(fds, stop - monotonic()):
                    fds.remove(fd)     # exited: its slot is freed below with the others
        watched = [[fd, deadline, 0, after_fork.identity(fd)] for fd in fds]
        with self.lock:
            # Slots without a socket to watch (closed already) are free now.
            self.exiting.extend(watched)
            for entry in self.exiting[len(self.exiting) - len(fds):][:shed]:
                entry[2] = 1            # a slot claimed for another process's waiter
            self._free_slots_locked(len(connections) - len(fds), max(shed - len(fds), 0))
            self.finish_exits_locked()

    def finish_exits(self):
        """Free the slots of closed connections whose backend has exited."""
        if self.exiting:
            with self.lock:
                self.finish_exits_locked()

    def finish_exits_locked(self):
        if not self.exiting:
            return
        freed, shed = finished(self.exiting)
        if freed:
            self._free_slots_locked(freed, shed)

    def _free_slots_locked(self, count, shed=0):
        if not count:
            return
        self.closing -= count
        if self.pool.budget is not None:
            self.pool.budget.release(count, shed)
        if self.waiters:
            self.hand_off_locked()

    def reclaim_used_locked(self):
        """Free the slots of in-use connections closed from outside or flagged ``leaked``."""
        freed = 0
        for cnx in [c for c in self.used if c.closed or getattr(c, 'leaked', False)]:
            if cnx.closed:
                self.move_locked(cnx, OUT)
                _logger.debug('%r: dropped a connection closed while in use', self.pool)
                if self.pool.budget is not None:
                    self.pool.budget.release()
            else:
                del cnx.leaked
                note_privileges(cnx)            # as give_back does
                self.move_locked(cnx, IDLE)
                self.pool.stats.reclaimed_leaked += 1
                _logger.info('%r: Free leaked connection to %r', self.pool,
                             key_database(cnx.pooled.key))
            freed += 1
        return freed

    def _timeout_error(self, waited):
        now = monotonic()
        holders = sorted(self.used.items(), key=lambda item: item[1].since)[:5]
        listed = '; '.join(f'[{i}] {h.describe(c, now)}' for i, (c, h) in enumerate(holders, 1))
        return PoolTimeout(
            f'The Connection Pool Is Full: all {self.maxconn} connections of this pool are in use '
            f'(db_maxconn = {self.maxconn}) and none was freed after waiting {waited:.1f} s '
            f'(db_pool_wait_timeout = {self.pool.settings.wait_timeout:g}). '
            f'Oldest holders: {listed or "none"}. If these holders are legitimate, raise '
            f'db_maxconn or db_pool_wait_timeout; if one holds a cursor it never closes, fix '
            f'the code at its borrow site.')
