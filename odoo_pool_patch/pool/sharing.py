"""Connections moving between the processes of an instance (``pool.sharing``,
:class:`Sharing`): waiting a moment for another process's connection in use
rather than opening one, parking a connection given back for a process that wants its
database, taking one parked or offered, lending ours, handing one given back to a thread
of this process waiting for the shared budget, and that wait itself.

Parking is deferred inside a request (:func:`deferred_parking`, around Odoo's request
dispatch): a connection given back there stays IDLE here, so the request's next cursor on
the same database (Odoo opens one to load the registry and match the route, then one for
the call) reuses it without a hand-over; at the end of the request the pool parks those of
its idle connections another process wants (:meth:`Sharing.park_wanted`), each by the same
locked steps as a park at give-back (IDLE to PARKING, then parked or back to IDLE: see
:mod:`.slots`). A give-back parks at once when another process is waiting for
that database right now.
"""
import collections
import contextlib
import logging
import os
import threading
import time

import psycopg2

from .. import faults
from ..dsn import key_database
from ..errors import PoolTimeout
from ..shared.backend_exit import fd_readable, socket_readable
from ..shared.exchange import neutralize, offerable, session_meta
from ..shared.outage import opened_before_restart
from ..shared.parking import IN_FLIGHT, mark_in_flight
from .slots import CLOSING, IDLE, IN_USE, LENDING, OUT, PARKING

_logger = logging.getLogger('odoo.sql_db.pool')
monotonic = time.monotonic

HANDOFF_BURST = 3      # same-database hand-offs in a row before a freed slot goes to the queue
# With the exchange and the budget full: how long a borrower that finds no idle connection
# to its database anywhere waits for one in use in another process to come back, rather than
# close a connection to another database and open a backend (fork, authentication, cold
# caches: several ms of server CPU, and that other database may then have none left).
# Measured on Odoo 18's web load at a budget of 12 (docs/benchmarks.rst): 0 ms served 100
# requests a second, 15 ms 139, 50 ms 156 (stock 166-177 in the same runs), 100 ms no better.
AWAIT_BUSY = 0.05
AWAIT_POLL = 0.0005    # its checks without parking (a connection back idle elsewhere)
AWAIT_SLICE = 0.005    # with parking: the wait wakes as one is parked; the other checks


class _Deferral(threading.local):
    active = False          # this thread serves a request (see deferred_parking)
    sharings = ()           # (the Sharing of) pools that kept a connection idle, not parked


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
        sharings, _DEFERRAL.sharings = _DEFERRAL.sharings, ()
        for sharing in sharings:
            try:                # after the request's work: it must not fail the request
                sharing.park_wanted()
            except Exception:   # noqa: BLE001 - (the connection is back idle, see park)
                _logger.warning('db_pooling: parking at the end of a request failed',
                                exc_info=True)


class BudgetWait:
    """A borrower of this process waiting in the shared budget's queue, which a thread
    giving back a connection to the same database may serve directly instead."""
    __slots__ = ('key', 'holder', 'cnx', 'event')

    def __init__(self, key, holder):
        self.key = key
        self.holder = holder
        self.cnx = None
        self.event = threading.Event()


class Sharing:
    """Moving the connections of one :class:`.connection_pool.ConnectionPool` between
    processes (``pool.sharing``, see the module)."""

    def __init__(self, pool):
        self.pool = pool
        self.books = pool.books
        self.reset()

    def reset(self):
        """No budget wait (a new pool, or a forked child's)."""
        self.budget_waits = {}      # dsn key -> deque of BudgetWait, oldest first
        self.handed_in_row = 0      # hand-overs to budget waiters in a row (HANDOFF_BURST)

    def park_now_locked(self, record):
        """At a give-back (under the pool lock), the connection of ``record`` may be
        parked (:meth:`should_park_locked`): whether to park it now. Inside a
        request only when a process waits for that database right now; otherwise it stays
        idle here for the request's next cursor and is parked at the request's end."""
        if _DEFERRAL.active and not self.pool.budget.exchange.parking.wanted(
                record.khash, AWAIT_BUSY):
            if self not in _DEFERRAL.sharings:
                _DEFERRAL.sharings += (self,)
            return False
        return True

    def await_in_use(self, exchange, key):
        """Wait up to ``AWAIT_BUSY`` for an idle connection to ``key`` when the budget is
        full, none is idle instance-wide and other processes have some in use (ours
        cannot come back while this thread waits: nested cursors). Not when
        borrowers queue for the budget (overload): nothing stays idle long enough to
        take, and the fair queue is where a slot comes from."""
        khash = exchange.hash_of(key)
        budget = self.pool.budget
        if not khash or not AWAIT_BUSY or self.books.count() >= self.books.maxconn or \
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
        with self.books.lock:
            self.pool.stats.awaited += 1
        deadline = monotonic() + AWAIT_BUSY
        while monotonic() < deadline:
            if parking is not None:
                parking.wait(khash, AWAIT_SLICE)    # wakes as soon as one is parked
            else:
                time.sleep(AWAIT_POLL)
            idle, in_use = exchange.elsewhere(khash)
            if idle or not in_use or key in self.books.idle or budget.has_room() or (
                    parking is not None and parking.count(khash)):
                return

    def should_park_locked(self, cnx):
        """Whether to park ``cnx`` rather than keep it idle here: another process
        needed its database lately, nobody waits for the budget, it is clean."""
        exchange = self.pool.budget.exchange
        record = cnx.pooled
        return exchange.parking is not None and self.pool.settings.reset == 'smart' and \
            not record.dirty and not self.pool.budget.waiting() and \
            not (record.expires and record.expires < monotonic() + 5) and \
            exchange.parking.wanted(record.khash)

    def park(self, cnx):
        """Send ``cnx`` to the parking (counted in ``books.closing`` meanwhile); kept idle
        here if it cannot go."""
        exchange = self.pool.budget.exchange
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
            with self.books.lock:
                if self.pool.closed or self.books.waiters:
                    return
                for stack in self.books.idle.values():
                    cnx = stack[-1]
                    if cnx not in tried and cnx.pooled.khash and self.should_park_locked(cnx):
                        break
                else:
                    return
                tried.add(cnx)
                self.books.move_locked(cnx, PARKING)     # as if given back: see _after_park
            self.park(cnx)

    def _closed_since_sent_locked(self, record):
        """Whether close_all() (or shutdown) ran while the connection of ``record`` was
        travelling (see ``lent_at`` in :meth:`.slots.Books.move_locked`)."""
        return self.pool.closed or self.books.closings != record.lent_at

    def _after_park(self, cnx, parked):
        record = cnx.pooled
        with self.books.lock:
            closed_since = self._closed_since_sent_locked(record)
            if parked:
                self.books.move_locked(cnx, OUT)     # our copy neutralized: its slot is freed here
                self.pool.stats.parked += 1
            elif closed_since:
                self.books.move_locked(cnx, CLOSING)     # closed too
            else:
                self.books.move_locked(cnx, IDLE)
            if self.books.waiters:
                self.books.hand_off_locked()
        if parked:      # (OUT first: a shell may take its next session at once)
            self.pool.budget.exchange.keep_shell(cnx)
            if closed_since:
                # The parking was drained before it landed there: its database may be
                # on its way out (DROP DATABASE).
                self.pool.budget.exchange.parking.drain(record.khash)
        elif closed_since:
            self.books.retire_sent_off(cnx)

    def hand_over_locked(self, cnx):
        """Give ``cnx`` to the oldest borrower of this process waiting in the shared
        budget's queue for the same database: it keeps its slot, and the borrower gets
        a connection at once instead of a new one after some other connection closed.
        At most HANDOFF_BURST in a row, so that the slots this process frees still
        reach the other borrowers of the queue (other processes, other databases)."""
        record = cnx.pooled
        waits = self.budget_waits.get(record.key)
        if not waits or self.handed_in_row >= HANDOFF_BURST:
            return False
        wait = waits.popleft()
        if not waits:
            del self.budget_waits[record.key]
        self.handed_in_row += 1
        record.last_used = monotonic()
        self.books.move_locked(cnx, IN_USE, wait.holder)     # in use still: another holder
        self.books.opening -= 1          # the local slot it reserved: the connection has one
        self.pool.stats.handed_over += 1
        wait.cnx = cnx
        wait.event.set()
        if self.books.waiters:           # the local slot it reserved is free for them
            self.books.hand_off_locked()
        return True

    def take(self, key, holder, connection_info=None):
        """Take an idle connection to ``key`` from another process (a local slot is
        reserved): it keeps the donor's age and lifetime. None if none came."""
        got = None
        claim = []      # what we hold, whatever is raised: [cnx, meta, ours, fd] (see exchange)
        exchange = self.pool.budget.exchange
        try:
            khash = exchange.hash_of(key)
            got = self._unpark(exchange, khash, key, claim)
            parked = got is not None
            if got is None:
                got = exchange.take(khash, key, self.pool.connection_factory, claim)
            if got is None:
                return None
            cnx, meta = got
            self.pool.sessions.prepare_connection(cnx, key)
            record = cnx.pooled
            record.take_over(meta)
            record.gen_cells = self.pool.outages().cells
            if opened_before_restart(cnx):
                with self.books.lock:                # closed with its slot, the caller opens one
                    self.books.move_locked(cnx, CLOSING)
                self.books.retire([cnx])
                return None
            record.cancel_info = connection_info   # for its cancel() (a shell's libpq cannot)
            record.direct = False if self.pool.settings.direct_host else None
            record.prefix = self.pool.sessions.prefix(cnx, key, holder)
        except BaseException:       # gevent.Timeout, Odoo's SIGXCPU: nothing may leak
            ours = claim[0] if claim and claim[2] and claim[0] is not None else None
            with self.books.lock:
                self.books.opening -= 1
                if ours is not None and ours.pooled.state != CLOSING:    # (else being closed)
                    # ours with its slot: closed like any other
                    self.books.move_locked(ours, CLOSING)
                if self.books.waiters:
                    self.books.hand_off_locked()
            if ours is not None:
                self.books.retire([ours])
            elif claim and claim[2] and len(claim) > 3:
                exchange.parking.retire(claim[3])   # received, not wrapped: slot ours
            raise
        with self.books.lock:
            self.books.opening -= 1
            self.books.move_locked(cnx, IN_USE, holder)
            if parked:
                self.pool.stats.unparked += 1
            else:
                self.pool.stats.taken += 1
        return cnx

    def evict_parked(self):
        """Close a parked connection of the database with the most parked (spare ones),
        waiting for its backend to exit: its budget slot is ours. False if none."""
        parking = self.pool.budget.exchange.parking
        got = parking.unpark_spare()
        if got is None:
            return False
        try:
            parking.close_and_wait(got[0])
        except BaseException:
            self.pool.budget.release()   # the slot came with it (its backend is on its way out)
            raise
        with self.books.lock:
            self.pool.stats.closed_room += 1
        return True

    def _unpark(self, exchange, khash, key, claim):
        """(connection, bookkeeping) of ``khash`` from the parking, its budget slot now
        ours; None if none is parked. Dead and expired ones are closed on the way.
        ``claim`` says what we hold if anything is raised (see :meth:`take`)."""
        parking = exchange.parking
        if parking is None or not khash:
            return None
        while True:
            got = parking.unpark(khash, claim)      # claim: [None, meta, True, fd]
            if got is None:
                parking.want(khash)
                return None
            fd, meta, parker, _parked_at = got
            if parker != self.pool.budget.pid:
                parking.want(khash)     # connections of this database move: keep parking
            if (meta['expires'] and meta['expires'] <= monotonic()) or fd_readable(fd):
                parking.retire(fd)      # expired, or the server said goodbye
                del claim[:]            # (after: until retired, the claim says so)
                continue
            try:
                cnx = exchange.wrap(fd, meta, key, self.pool.connection_factory, khash)
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
        if self.pool.settings.reset != 'smart' or self.pool.closed:
            return None
        with self.books.lock:
            for stack in self.books.idle.values():
                if stack[0].pooled.khash != khash:
                    continue
                cnx = stack[-1]
                record = cnx.pooled
                if record.dirty or (record.expires and record.expires < monotonic() + 5) \
                        or not offerable(cnx) or socket_readable(cnx):
                    return None
                self.books.move_locked(cnx, LENDING)
                return cnx
        return None

    def lent(self, cnx, given):
        """End of a :meth:`lend_idle`: ``given`` (the taker has the session and its budget
        slot: drop our copy without ending the session), else back to idle (closed if
        ``close_all`` ran meanwhile)."""
        # (Given: the exchange pointed our copy away before the socket left.)
        with self.books.lock:
            record = cnx.pooled
            doomed = not given and self._closed_since_sent_locked(record)
            if doomed:
                self.books.move_locked(cnx, CLOSING)
            elif given:
                self.books.move_locked(cnx, OUT)
                self.pool.stats.given += 1
            else:
                last_used = record.last_used
                self.books.move_locked(cnx, IDLE)
                record.last_used = last_used
            if self.books.waiters:
                self.books.hand_off_locked()
        if given:       # (OUT first: a shell may take its next session at once)
            self.pool.budget.exchange.keep_shell(cnx)
        if doomed:
            self.books.retire_sent_off(cnx)

    def wait_for_budget(self, key, holder):
        """Wait for a slot of the shared budget (a local slot is already reserved): None
        once taken, or the connection to ``key`` another thread gave back meanwhile
        (already booked in use, see :meth:`hand_over_locked`)."""
        budget = self.pool.budget
        self.pool.stats.budget_waits += 1
        wait = BudgetWait(key, holder)
        with self.books.lock:
            self.budget_waits.setdefault(key, collections.deque()).append(wait)
        started, taken, interrupted = monotonic(), False, False
        try:
            taken = budget.acquire(budget.priority(key_database(key), holder.thread),
                                   self.pool.settings.wait_timeout, wake=wait.event)
        except BaseException:       # gevent.Timeout, KeyboardInterrupt
            interrupted = True
            raise
        finally:
            with self.books.lock:
                waits = self.budget_waits.get(key)
                if waits and wait in waits:
                    waits.remove(wait)
                    if not waits:
                        del self.budget_waits[key]
                if wait.cnx is not None and interrupted:
                    self.books.release_grant_locked(wait.cnx)    # back to idle
                elif wait.cnx is None and not taken:
                    self.books.opening -= 1
                    if self.books.waiters:
                        self.books.hand_off_locked()
        if wait.cnx is not None:
            if taken:
                budget.release()    # granted in the same instant: the slot is not needed
            return wait.cnx
        if not taken:
            self.pool.stats.budget_timeouts += 1
            raise PoolTimeout(
                f'The Connection Pool Is Full: the instance-wide budget of {budget.budget} '
                f'server connections (db_pool_max_connections) stayed in use for '
                f'{monotonic() - started:.1f} s (db_pool_wait_timeout = '
                f'{self.pool.settings.wait_timeout:g}). Held by: {budget.describe_holders()}. '
                f'Raise db_pool_max_connections if the server allows it, or look for long '
                f'transactions in the processes above.')
