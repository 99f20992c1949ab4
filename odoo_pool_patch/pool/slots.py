"""Slots and books of the per-process pool (mixed into :class:`.pool.ConnectionPool`).

The books, all under the pool lock (see the lock order in :mod:`.pool`): ``_idle`` (DSN
key -> stack of idle connections, the last freed last), ``_used`` (connection ->
:class:`.borrowers.Holder`), ``_opening`` / ``_closing`` (slots reserved for a connect,
held by a connection whose backend is exiting or that travels to another process),
``_exiting`` (sockets watched for that exit), ``_waiters`` (FIFO of borrowers waiting for
a slot). A slot is counted for every connection in use, idle, being opened or closed;
never more than ``maxconn``. Each move of a connection between books is one helper here
(``_book_locked``, ``_unbook_locked``, ``_push_idle_locked``, ``_remove_idle_locked``,
``_send_off_locked``) that also publishes the move to the exchange.

A grant says what a borrower got: an idle connection of its own (booked in use at once,
granted as itself), or a :class:`Grant`, a slot reserved here and what to do with it.
"""
import logging
import threading
import time

from .. import after_fork
from ..dsn import key_database
from ..errors import PoolTimeout
from ..sessions.session_tracking import note_privileges
from ..shared.backend_exit import begin_close, exited, finished

_logger = logging.getLogger('odoo.sql_db.pool')
monotonic = time.monotonic

MISSING = object()      # (a connection in no book)
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
    """A slot reserved in this pool for a borrower (counted in ``_opening``), and what
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


class SlotBooks:
    """The books and slot accounting of :class:`.pool.ConnectionPool` (see the module)."""

    def _count(self):
        return len(self._used) + self._n_idle + self._opening + self._closing

    def _acquire_locked(self, key, holder, take=False, evict=True):
        """A reused idle connection (now in use), or a :class:`Grant`: NEW, BUDGET, a
        room, EVICT (if ``evict``) or, if ``take``, TAKE."""
        if not self._waiters:
            grant = self._grant_locked(key, holder, take, evict)
            if grant is None and self._reclaim_used_locked():
                grant = self._grant_locked(key, holder)
            if grant is not None:
                return grant
        return self._wait_locked(key, holder)

    def _grant_locked(self, key, holder, take=False, evict=False):
        """Take a slot for ``key``: a reused idle connection (booked in use at
        once, so the slot is never counted free in between), or a :class:`Grant`:
        TAKE (if ``take`` and another process offers one), NEW, a room, EVICT (if
        ``evict`` and connections are parked) or BUDGET; None when there is no slot."""
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
                return TAKE
        if self._exiting and self._count() >= self._maxconn:
            self._finish_exits_locked()
        budget = self.budget
        if self._count() < self._maxconn and (
                budget is None or budget.try_acquire(budget.priority(key_database(key), holder.thread))):
            self._opening += 1
            return NEW
        victim = self._room_victim_locked()
        if victim is not None:      # full, but idle for another DSN: make room
            self.stats.closed_room += 1
            self._opening += 1
            return room(victim)
        if evict and self._count() < self._maxconn and budget is not None and \
                budget.exchange is not None and budget.exchange.parking is not None and \
                budget.exchange.parking.parked():
            self._opening += 1              # full: make room on a parked connection
            return EVICT
        if self._count() < self._maxconn:   # room here, but the shared budget is full
            self._opening += 1
            return BUDGET
        return None

    def _wait_locked(self, key, holder):
        timeout = self.settings.wait_timeout
        if timeout <= 0:
            self.stats.timeouts += 1
            raise self._timeout_error(0.0)
        waiter = Waiter(key, holder, self._lock)
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
        if grant.__class__ is Grant:
            self._opening -= 1
            if grant is NEW and self.budget is not None:
                self.budget.release()
            if grant.kind == 'room' and not grant.victim.closed:
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
        """``cnx`` is no longer in use: its holder, or ``MISSING`` if it was not."""
        holder = self._used.pop(cnx, MISSING)
        khash = cnx.pooled.khash
        if holder is not MISSING and khash:
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

    def _retire_sent_off(self, cnx):
        """Close a connection back from its trip after a ``close_all`` (still counted in
        ``_closing``, see :meth:`_send_off_locked`); it leaves ``_lent`` once closed."""
        try:
            self._retire([cnx])
        finally:
            self._lent.discard(cnx)

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
