"""Idle connections parked in kernel queues, for any worker of the instance to take.

The exchange (:mod:`.exchange`) moves an idle connection from the process that
holds it to one that needs it: a round trip to that process, whose serving
thread must wake up and get the GIL. When the connections of a database move
between processes all the time (more workers times databases than the budget
has connections), a process giving one back *parks* it instead: it sends the
socket and its bookkeeping into a queue, and the next process that needs that
database receives it with one non-blocking ``recvmsg``. No donor, no wake-up,
no thread: the kernel holds the socket in between.

The queues are ``AF_UNIX`` datagram socket pairs made by the process that
attaches the exchange (Odoo's master, in ``post_load``) before it forks its
workers, so every worker holds both ends; a process that is not a descendant
(another container, the gevent process) has its own and never sees these.
Each database in use gets one of ``N_LOT`` *lots* (a pair, and a row of the
shared state: owner token, key hash, connections parked, change counter,
demand), claimed under the shared lock and freed when empty and unwanted.

Parking is demand-driven: a connection is parked at give-back only if another
process needed that database in the last ``DEMAND`` seconds (found none of its
own idle). A lone worker keeps reusing its own connection at no cost.

Budget: a parked connection's slot belongs to no process (``H_PARKED``). Who
owns a session is decided under the shared lock, in one step each way. Park:
under the lock the parker's ``held`` - 1, the lot's count and ``H_PARKED`` + 1,
and the ``sendmsg`` (non-blocking: a full queue undoes the counts in the same
step); the parker then drops its copy. Unpark: under the lock the ``recvmsg``
and the reverse into the taker's ``held``. So under the lock a lot's count
equals the connections in its queue, except after a process died inside the
locked step between the counts and the send (a count with no connection behind
it, never a connection uncounted): the maintenance finds a lot counted but
empty and unchanged across two passes and corrects it, under the lock, so a
parker stalled anywhere (it holds the lock, or has not counted yet) is never
mistaken for a crash. The parker's copy of a parked socket is pointed at
/dev/null before it is closed: nothing it does can end the session.

Maintenance (any process, see :meth:`Parking.tick`): the queue is FIFO, so its
head is the connection parked longest; it is closed past the idle timeout or
its max lifetime (keeping ``min_idle`` instance-wide), and parked connections
are closed first while borrowers wait for the budget. ``close_all(dsn)`` (a
database dropped) closes that database's parked connections.
"""
import logging
import marshal
import os
import random
import socket
import struct
import threading
import time

from .. import after_fork
from .. import faults
from . import shared_state as ss
from .backend_exit import finished, readable, wait_exited

_logger = logging.getLogger('odoo.sql_db.pool')

DEMAND = 1.0            # seconds a demand from another process keeps a database parked
LOT_REUSE = 60.0        # seconds an empty lot stays its database's after the last demand
EXIT_WAIT = 2.0         # seconds a closed parked connection's slot waits for its backend to exit
MESSAGE = 16384         # bytes: more than a message (bookkeeping and session parameters) needs
_TERMINATE = b'X\0\0\0\4'
monotonic = time.monotonic


_CLOEXEC = int(getattr(socket, 'MSG_CMSG_CLOEXEC', 0))     # (an int: no enum | per call)
_ONE_FD = socket.CMSG_LEN(4)


# Descriptors of sessions on their way between processes (a copy being sent, one just
# received), by this process, with what each is open on (after_fork.identity): a child
# forked meanwhile closes its copies, which would otherwise keep such a session open
# after its owner is gone, and only those (see after_fork.close_inherited). Marked
# before use, unmarked before being closed.
IN_FLIGHT = {}


def mark_in_flight(fd):
    IN_FLIGHT[fd] = after_fork.identity(fd)


def _close_in_flight_after_fork():
    for fd, was in list(IN_FLIGHT.items()):
        after_fork.close_inherited(fd, was)
    IN_FLIGHT.clear()


after_fork.register('parking', _close_in_flight_after_fork)


def recv_fds(sock, size, flags=0):
    """(message, [descriptor]) from a Unix socket, the descriptors close-on-exec (as
    socket.recv_fds, which ignores its flags, cannot give them)."""
    message, ancdata, _flags, _addr = sock.recvmsg(size, _ONE_FD, flags | _CLOEXEC)
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f'{len(data) // 4}i', data[:len(data) - len(data) % 4]))
    for fd in fds:
        mark_in_flight(fd)
    return message, fds


def _ms():
    return int(monotonic() * 1000)


class Parking:
    """The parking lots of one instance, as seen by this process.

    :param budget: this process's :class:`~.budget.SharedBudget` (its shared state
        holds the lots' rows).
    """

    def __init__(self, budget):
        self.budget = budget
        self.state = budget.state
        self.token = random.getrandbits(62) + 1     # these queues' lots, not another family's
        self._rows = ss.Lot.all(self.state.cells)  # a view of each lot's row
        self._pairs = []        # lot -> (receiving end, sending end)
        try:
            for _ in range(ss.N_LOT):
                ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                for end in ends:
                    end.setblocking(False)
                self._pairs.append(ends)
        except OSError:
            self.close()
            raise
        self._reset_process()
        self.join()

    def join(self):
        """Mark this process's row as holding these queues (its lots live while it does)."""
        self.state.process(self.budget.row).family = self.token

    def _reset_process(self):
        self._lots = {}         # key hash -> lot number (a cache: the lot's row says)
        self._absent = {}       # key hash -> ms until which it is not looked for again
        self._exiting = []      # [fd, give-up deadline, shed, identity] of closed parked ones
        self._exit_lock = threading.Lock()
        self._seen = {}         # lot -> change counter when last seen counted but empty

    def close(self):
        """Close the queues (their parked connections end when no process holds them)."""
        for ends in self._pairs:
            for end in ends:
                end.close()
        self._pairs = []
        me = self.state.process(self.budget.row)
        if me.family == self.token:
            me.family = 0           # its lots are freed at the next reaping

    def after_fork_in_child(self):
        exiting = self._exiting
        try:
            for entry in exiting:   # the parent watches these (see after_fork.close_inherited)
                after_fork.close_inherited(entry[0], entry[3])
        finally:
            self._reset_process()
            self.join()             # the budget took a row of its own first

    # ------------------------------------------------------------------ lots
    def _lot(self, khash):
        """The :class:`~.shared_state.Lot` of ``khash``, or None (lock-free)."""
        number = self._lots.get(khash)
        if number is not None:
            lot = self._rows[number]
            if lot.hash == khash and lot.owner == self.token:
                return lot
        now = _ms()
        if self._absent.get(khash, 0) > now:
            return None
        for lot in self._rows:
            if lot.hash == khash and lot.owner == self.token:
                self._lots[khash] = lot.index
                return lot
        self._absent[khash] = now + 1000    # a lot another process claims is seen within 1 s
        return None

    def _claim(self, khash):
        """A lot for ``khash``: its own, else a free one (never used, or empty and
        unwanted for LOT_REUSE seconds); None when all are taken."""
        now = _ms()
        if self._absent.get(None, 0) > now:
            return None             # all lots were taken a moment ago
        self._absent.pop(khash, None)
        with self.state.locked():
            found = self._lot(khash)
            if found is not None:
                return found
            for lot in self._rows:
                if not lot.owner or (lot.count <= 0 and
                                     now - max(lot.want_ms, lot.free_ms) > LOT_REUSE * 1000):
                    lot.clear()
                    lot.owner = self.token
                    lot.hash = khash
                    lot.free_ms = now
                    self._lots[khash] = lot.index
                    return lot
        self._absent[None] = now + 1000
        return None

    def count(self, khash):
        """Connections of ``khash`` parked (lock-free)."""
        lot = self._lot(khash)
        return lot.count if lot is not None else 0

    def want(self, khash):
        """This process needed a connection of ``khash`` it did not hold: processes that
        give one back park it for DEMAND seconds (racy writes: a hint)."""
        lot = self._lot(khash) or self._claim(khash)
        if lot is None:
            return
        pid = self.budget.pid
        if lot.want_pid != pid:
            lot.other_ms = lot.want_ms      # a demand not ours
            lot.want_pid = pid
        lot.want_ms = _ms()

    def wanted(self, khash, within=None):
        """Whether another process needed ``khash`` in the last ``within`` seconds
        (default ``DEMAND``)."""
        lot = self._lot(khash)
        if lot is None:
            return False
        since = _ms() - (DEMAND if within is None else within) * 1000
        return (lot.want_ms > since and lot.want_pid != self.budget.pid) or lot.other_ms > since

    def wait(self, khash, timeout):
        """Sleep up to ``timeout`` seconds, less if a connection of ``khash`` is parked."""
        lot = self._lot(khash)
        if lot is None or not self._pairs:
            time.sleep(timeout)
            return
        try:
            readable((self._pairs[lot.index][0],), timeout)
        except (OSError, ValueError):
            time.sleep(timeout)

    # ------------------------------------------------------------------ park / unpark
    def park(self, khash, fd, meta, sent=None):
        """Send the socket ``fd`` (a copy: the caller drops its own on success) with its
        bookkeeping ``meta`` to ``khash``'s lot, with its budget slot. False if not."""
        lot = self._lot(khash)
        if lot is None or not self._pairs:
            return False
        data = marshal.dumps((khash, self.budget.pid, monotonic(), meta))
        me = self.state.process(self.budget.row)
        if faults.plan:
            faults.hit('parking.park.before_lock')
        with self.state.locked() as cells:
            if lot.hash != khash or lot.owner != self.token:
                return False
            me.held -= 1
            lot.count += 1
            lot.seq += 1
            self.state.header.parked += 1
            if sent is not None:
                # Before the send: interrupted after it (a signal handler raising as the C
                # call returns) the session is in the queue and must count as sent. One
                # interrupted before it is counted but absent: healed, and lost, never
                # two owners.
                sent[0] = True
            try:
                socket.send_fds(self._pairs[lot.index][1], [data], [fd])
            except OSError:         # the queue is full (socket buffer): certainly not sent
                if sent is not None:
                    sent[0] = False
                me.held += 1
                self._counted_out_shared_locked(cells, lot)
                return False
            if faults.plan:
                faults.hit('parking.park.after_send')
        if faults.plan:
            faults.hit('parking.park.after_lock')
        return True

    def unpark(self, khash, claim=None):
        """(fd, meta, parker pid, parked at) of the connection of ``khash`` parked longest,
        its slot now this process's; None if none. ``claim`` (a list): set to
        ``[None, None, True, fd]`` as soon as the descriptor is ours, whatever is raised."""
        lot = self._lot(khash)
        if lot is None or lot.count <= 0:
            return None
        return self._receive(lot, 'unparked', claim=claim)

    def _receive(self, lot, counter=None, keep=None, claim=None):
        """Receive the head of a lot, its slot now ours (one locked step, so that
        evictors keeping ``keep`` idle connections instance-wide never both go below)."""
        me = self.state.process(self.budget.row)
        with self.state.locked() as cells:
            if keep is not None and self.state.idle_total() <= keep:
                return None
            try:
                data, fds = recv_fds(self._pairs[lot.index][0], MESSAGE)
            except (BlockingIOError, IndexError):
                return None
            if claim is not None and fds:
                claim[:] = [None, None, True, fds[0]]
            me.held += 1
            self._counted_out_shared_locked(cells, lot)
            if counter:
                self.budget.count_shared_locked(cells, counter)
        if faults.plan:
            faults.hit('parking.receive.after_receive')
        try:
            khash, parker, parked_at, meta = marshal.loads(data)
            if khash != lot.hash:
                raise ValueError('a connection of another database')
            return fds[0], meta, parker, parked_at
        except Exception:       # noqa: BLE001 - cannot happen but must not leak
            if claim is not None:
                del claim[:]
            for fd in fds:
                self.retire(fd)
            if not fds:
                self.budget.release()
            return None

    def _counted_out_shared_locked(self, cells, lot):
        lot.count = max(lot.count - 1, 0)
        lot.seq += 1
        header = self.state.header
        header.parked = max(header.parked - 1, 0)
        if not lot.count:
            lot.free_ms = _ms()

    # ------------------------------------------------------------------ closing
    def retire(self, fd, shed=False):
        """Close a parked connection this process received (its slot is ours): tell the
        backend goodbye, free the slot once it has exited (see backend_exit.begin_close)."""
        IN_FLIGHT.pop(fd, None)     # (the goodbye is said: a forked child's copy is harmless)
        try:
            os.write(fd, _TERMINATE)
        except OSError:
            pass
        was = after_fork.identity(fd)
        with self._exit_lock:
            self._exiting.append([fd, monotonic() + EXIT_WAIT, shed, was])

    @staticmethod
    def close_and_wait(fd, timeout=EXIT_WAIT):
        """Close a parked connection this process received and wait (up to ``timeout``)
        for its backend to exit; its slot stays this process's (for a new connection)."""
        IN_FLIGHT.pop(fd, None)
        try:
            os.write(fd, _TERMINATE)
        except OSError:
            pass
        wait_exited((fd,), timeout)

    def unpark_spare(self):
        """Like :meth:`unpark`, from the lot with the most connections parked."""
        best = None
        for lot in self._own_lots():
            if lot.count > 0 and (best is None or lot.count > best.count):
                best = lot
        return self._receive(best) if best is not None else None

    def exits_pending(self):
        """Whether slots of retired connections wait for their backend to exit (lock-free)."""
        return bool(self._exiting)

    def finish_exits(self, timeout=0.0):
        """Free the slots of retired connections whose backend has exited."""
        if not self._exiting:
            return 0
        with self._exit_lock:       # the maintenance thread and a borrower's: one closes
            return self._finish_exits_exit_locked(timeout)

    def _finish_exits_exit_locked(self, timeout):
        freed, shed = finished(self._exiting, timeout)
        if freed:
            self.budget.release(freed, shed)
        return freed

    def drain(self, khash):
        """Close every parked connection of ``khash`` (its database is being dropped)."""
        lot = self._lot(khash)
        closed = 0
        while lot is not None and lot.count > 0:
            got = self._receive(lot)
            if got is None:
                break
            self.retire(got[0])
            closed += 1
        deadline = monotonic() + EXIT_WAIT
        while self._exiting and monotonic() < deadline:
            self.finish_exits(0.01)
        return closed

    def tick(self, full, idle_timeout):
        """Maintenance: free exited slots; close parked connections for the budget's
        waiters; on a ``full`` pass, close those parked past ``idle_timeout`` or their
        max lifetime and correct counts left by a crash. Returns connections closed."""
        closed = 0
        header = self.state.header
        if header.parked > 0 and header.waiting:
            for _ in range(self.budget.claim_shed(header.parked)):
                got = self._receive_any()
                if got is None:
                    self.budget.release(0, 1)   # nothing parked after all: unclaim
                    continue
                self.retire(got[0], shed=True)
                closed += 1
        if full:
            closed += self._evict(idle_timeout)
        self.finish_exits()
        return closed

    def _own_lots(self):
        return [lot for lot in self._rows if lot.owner == self.token]

    def _receive_any(self):
        for lot in self._own_lots():
            if lot.count > 0:
                got = self._receive(lot)
                if got is not None:
                    return got
        return None

    def _evict(self, idle_timeout):
        closed, now = 0, monotonic()
        for lot in self._own_lots():
            if lot.count <= 0:
                continue
            for _ in range(lot.count):
                head = self._peek(lot)
                if head is None:
                    self._heal(lot)
                    break
                _khash, _parker, parked_at, meta = head
                expires = meta.get('expires') or 0
                old = idle_timeout and parked_at + idle_timeout <= now
                if not (old or (expires and expires <= now)):
                    break
                keep = None if expires and expires <= now else self.budget.min_idle
                got = self._receive(lot, keep=keep)     # None: min_idle are kept
                if got is None:
                    break
                self.retire(got[0])
                closed += 1
        return closed

    def _peek(self, lot):
        """The head message of ``lot`` without taking it (its socket is not received)."""
        try:
            data = self._pairs[lot.index][0].recv(MESSAGE, socket.MSG_PEEK)
        except (BlockingIOError, IndexError):
            return None
        try:
            return marshal.loads(data)
        except Exception:       # noqa: BLE001
            return None

    def _heal(self, lot):
        """A lot counted but empty: unchanged since the last pass that saw it so, its
        count is a crash's leftover (a parker or taker killed between its two steps)."""
        seq = lot.seq
        if self._seen.get(lot.index) != seq:
            self._seen[lot.index] = seq
            return
        with self.state.locked() as cells:
            if lot.seq != seq or self._peek(lot) is not None:
                return
            lost = lot.count
            lot.count = 0
            lot.seq += 1
            header = self.state.header
            header.parked = max(header.parked - lost, 0)
            if header.waiting:
                self.budget.grant_shared_locked(cells)
        _logger.info('db_pooling: freed %d budget slot(s) of parked connections lost by a '
                     'process that died while parking or taking one', lost)
        self._seen.pop(lot.index, None)

    # ------------------------------------------------------------------ figures
    def parked(self):
        return self.state.header.parked
