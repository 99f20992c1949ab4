"""Idle connections move between the processes of an instance instead of being reopened.

A libpq connection lives in one process, but its server session is only a
socket. When a worker needs a connection to a database it holds none of, and
another process of the instance holds one idle, the taker asks that process
for it (``db_pool_shared_idle``): the donor sends the socket over a Unix socket
(``SCM_RIGHTS``, as PgBouncer's online restart passes its server sockets), the
taker gives libpq a fresh connection whose start-up it answers itself with the
donor's session parameters, then puts the real socket under it (``dup2``).
The backend, its warm caches and its budget slot change process; no server
connection is opened or closed. It costs a fraction of a millisecond, against
several for a new backend (fork, authentication, cold catalog caches).

Who offers what is in the shared state: per process, up to ``N_OFFER`` entries
(hash of the database key, idle connections, connections in use), written by
that process only, read lock-free by takers. A stale offer costs the taker one
refusal. The in-use count tells a borrower that finds nothing idle whether a
connection to its database will come back soon (see ``pool.sharing.AWAIT_BUSY``).

Only clean connections move: no transaction, no session state (``cnx.pooled.dirty``),
plain TCP or Unix socket (never TLS: its state lives in the donor's libpq),
not to the long-lived databases (LISTEN), not close to their max lifetime.

The hand-over protocol: one session, one owner
-----------------------------------------------
A server session must never be driven by two processes. Who owns a session in
flight is decided by one cell, the donor row's ``P_GIVEN`` (the *token*),
written only under the shared lock (:meth:`SharedState.locked`):

========================  ========================================================
token                     meaning
========================  ========================================================
``+s`` (promised)         the donor promised the connection to request ``s``;
                          written by the donor before the descriptor leaves it
``-s`` (taken)            the taker of request ``s`` owns the session and its
                          budget slot (donor ``held`` - 1, taker ``held`` + 1 in
                          the same locked step); written by that taker only if
                          the token is ``+s``
``0`` (settled)           no hand-over in flight: written by the donor when it
                          settles ``s`` and finds ``+s`` (the taker did not take
                          it in time: the donor keeps the connection)
========================  ========================================================

``s`` is a random 62-bit serial chosen by the taker for each request, and a
donor serves one request at a time (one thread), so once a donor settled
``s`` the token never reads ``+s`` again: a late taker (delayed between
receiving the descriptor and taking the slot: a GC pause, a stand-in
start-up held up, a starved container) finds ``0``, ``+s2`` or ``-s2`` and
gives up, dropping its copy of the socket without a word to the server. The
donor settles without the lock when the taker acknowledged (``-s`` is then
certain), else under the lock: ``-s`` means given (its copy is dropped),
anything else it rewrites to ``0`` and the connection goes back idle.

What a crash (or SIGKILL) leaves at each step: donor dies before sending -- the
taker receives nothing; after sending, before the taker took the slot -- the
taker takes it (the token still reads ``+s``) or, the donor's row reaped, gives
up (a reaped row says nothing: the donor may have settled and handed the session
on before it died), and the session ends with the last copy; taker dies before taking the slot -- the donor settles to ``0`` and
keeps the session (the taker's descriptor closed by its death, no Terminate
sent); taker dies after taking it -- the donor settles to given and drops its
copy, the session ends with the taker's descriptor and its slot is freed with
the taker's row. Exceptions at any point (Odoo's SIGXCPU handler, gevent's
Timeout): the taker records in a *claim* (``[connection, meta, taken]``, set
inside the locked step) what it holds, so the pool closes a taken connection
with its slot and drops an untaken copy; the donor settles in a ``finally``.
The windows left are the bytecodes right after a C call that returned a
descriptor (``recvmsg``, ``dup``) and before Python bound it: interrupted there,
the descriptor stays open, never driven, until the process ends (a received
parked one also leaves its lot counted until the maintenance heals it, its
backend alive meanwhile: one session over the budget). Descriptors in flight
are closed in a child forked meanwhile (``parking.IN_FLIGHT``). Fault points
(:mod:`.faults`) sit at every step.

Both ends check who is on the other side (``SO_PEERCRED``: same user, the
expected pid), as abstract Unix socket names are visible to every local user.
Needs libpq 14 or later (abstract Unix socket addresses).
"""
import hashlib
import json
import logging
import os
import random
import secrets
import socket
import struct
import threading
import time
import weakref

import psycopg2
import psycopg2.extensions

from .. import faults
from ..sessions.conn_record import ensure_record
from ..sessions.session_tracking import restore_characteristics, shell_class
from . import shared_state as ss
from .parking import IN_FLIGHT, Parking, mark_in_flight, recv_fds

# An offer's fields in the list :meth:`IdleExchange._offers` reads in one go
_HASH, _IDLE, _IN_USE = (ss.Offer.FIELDS[name] for name in ('hash', 'idle', 'in_use'))

_logger = logging.getLogger('odoo.sql_db.pool')

# Session parameters the server reports (GUC_REPORT), replayed to the taker's libpq.
REPORTED = ('application_name', 'client_encoding', 'DateStyle', 'default_transaction_read_only',
            'in_hot_standby', 'integer_datetimes', 'IntervalStyle', 'is_superuser',
            'scram_iterations', 'search_path', 'server_encoding', 'server_version',
            'session_authorization', 'standard_conforming_strings', 'TimeZone')
REPLY_TIMEOUT = 0.05    # seconds a taker waits for a donor (a busy donor thread waits for the GIL)
ACK_TIMEOUT = 0.5       # seconds a donor waits for the taker to say it took the connection
SKIP_SLOW_DONOR = 5.0   # seconds a taker leaves alone a donor that did not answer in time
MIN_LIBPQ = 140000      # abstract Unix socket addresses in libpq
MAX_SHELLS = 2          # per database: psycopg2 connections kept to take the next one into
MAX_SHELLS_TOTAL = 16   # per process (each holds a descriptor of /dev/null)
_CRED = struct.Struct('3i')
_SSL_REQUEST, _GSS_REQUEST = 80877103, 80877104
_REQUEST = struct.Struct('!qqqq')       # key hash, taker pid, donor row, sequence number


def key_hash(key):
    """Stable hash of a DSN key across processes, application_name left out (Odoo
    names each process's connections after its pid), never 0."""
    text = repr(tuple(item for item in key if item[0] != 'application_name'))
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), 'big', signed=True)
    return value or 1


def supported():
    """Why this process cannot exchange connections ('' when it can)."""
    if psycopg2.extensions.libpq_version() < MIN_LIBPQ:
        return (f'libpq {psycopg2.extensions.libpq_version()} is older than 14 (abstract Unix '
                f'socket addresses)')
    if not hasattr(socket, 'send_fds') or not hasattr(socket, 'SO_PEERCRED'):
        return 'this platform cannot pass sockets between processes'
    return ''


def attach(budget, settings):
    """Give ``budget`` its exchange when ``db_pool_shared_idle`` is on and this process
    can take part; '' when attached, else why not."""
    if not settings.shared_idle:
        return 'db_pool_shared_idle is off'
    why_not = supported()
    if not why_not:
        budget.exchange = IdleExchange(budget)
    return why_not


def peer(conn):
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _CRED.size))
    return pid, uid


def offerable(cnx):
    """Whether an idle connection can move to another process (no round trip)."""
    try:
        if cnx.closed or cnx.status != psycopg2.extensions.STATUS_READY:
            return False
        info = cnx.info                     # (a new object at each access)
        return (info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
                and not info.ssl_in_use and not gss_in_use(cnx)
                and (info.parameter_status('DateStyle') or '').startswith('ISO'))
    except psycopg2.Error:
        return False


_GSS = []       # [PQgssEncInUse] once looked up, [None] where it cannot be


def gss_in_use(cnx):
    """Whether ``cnx`` is GSSAPI-encrypted: its encryption state lives in this process's
    libpq, like TLS's, so it must never move. Asked of the libpq psycopg2 uses
    (``PQgssEncInUse``, libpq 12+; psycopg2 does not expose it); True when that cannot
    be asked of a libpq that could encrypt (the connection then stays here)."""
    if not _GSS:
        function = None
        try:
            import ctypes
            from psycopg2 import _psycopg
            function = ctypes.CDLL(_psycopg.__file__).PQgssEncInUse
            function.restype, function.argtypes = ctypes.c_int, [ctypes.c_void_p]
        except (ImportError, OSError, AttributeError) as exc:
            if psycopg2.extensions.libpq_version() >= 120000:
                _logger.info('db_pooling: cannot tell whether connections are GSSAPI-encrypted '
                             '(%s): none moves between processes', exc)
                function = False
        _GSS.append(function)
    function = _GSS[0]
    if function is None:
        return False        # libpq < 12: no GSSAPI encryption at all
    if function is False or cnx.closed:
        return function is False
    return bool(function(cnx.pgconn_ptr))


class IdleExchange:
    """The idle connections this process offers to, and takes from, the others.

    :param budget: this process's :class:`~.budget.SharedBudget`.
    """

    def __init__(self, budget):
        self.budget = budget
        self.state = budget.state
        self._tag = hashlib.sha1(self.state.path.encode()).hexdigest()[:12]
        self._lock = threading.Lock()
        self._hashes = {}           # dsn key -> key hash (0: never offered)
        self._reset_process()
        try:                        # made before Odoo forks its workers: they share it
            self.parking = Parking(budget)
        except OSError as exc:
            _logger.info('db_pooling: cannot make the parking queues (%s); idle connections '
                         'move between processes on request only', exc)
            self.parking = None

    def close(self):
        """Stop parking (the queues' connections end when no process holds them)."""
        if self.parking is not None:
            self.parking.close()
            self.parking = None

    def _reset_process(self):
        self._counts = {}           # key hash -> idle connections of this process
        self._entries = {}          # key hash -> offer entry index in our row
        self._offer_rows = None     # views of our row's offers (see _offers_of_row)
        self._listener = None
        self._slow = {}             # donor pid -> monotonic time until which it is skipped
        self._pools = weakref.WeakSet()
        self._shells = {}           # key hash -> [psycopg2 connections over /dev/null]
        self._n_shells = 0
        self._wrap_lock = threading.Lock()

    def after_fork_in_child(self):
        """A forked child offers nothing yet; the parent's listener is not ours."""
        if self._listener:
            self._listener.close()
        self._lock = threading.Lock()
        self._reset_process()
        if self.parking is not None:
            self.parking.after_fork_in_child()

    # ------------------------------------------------------------------ offers
    def hash_of(self, key):
        khash = self._hashes.get(key)
        if khash is None:
            from .budget import LONG_LIVED_DATABASES
            from ..dsn import key_database
            khash = 0 if key_database(key) in LONG_LIVED_DATABASES else key_hash(key)
            self._hashes[key] = khash
        return khash

    def add_pool(self, pool):
        with self._lock:
            self._pools.add(pool)

    def changed(self, khash, idle=0, in_use=0):
        """This process holds ``idle`` more (or fewer) idle connections of ``khash``, and
        ``in_use`` more (or fewer) in use."""
        with self._lock:
            counts = self._counts.get(khash)
            if counts is None:
                counts = self._counts[khash] = [0, 0]
            counts[0] += idle
            counts[1] += in_use
            offers = self._offers_of_row()
            entry = self._entries.get(khash)
            if entry is None:
                entry = self._new_entry_locked(khash, counts, offers)
                if entry is None:
                    return
            offer = offers[entry]   # (by index: this runs at every borrow and give-back)
            offer.cells[offer.start + _IDLE] = counts[0]
            offer.cells[offer.start + _IN_USE] = counts[1]

    def _offers_of_row(self):
        """The Offer rows of this process's row (made again when the row changes: a fork)."""
        offers = self._offer_rows
        if offers is None or offers[0].index != self.budget.row * ss.N_OFFER:
            offers = self._offer_rows = ss.Offer.of_process(self.state.cells, self.budget.row)
        return offers

    def _new_entry_locked(self, khash, counts, offers):
        """An offer entry for ``khash`` (its hash written), or None: nothing to publish,
        no listener to answer takers, or the entries all in use."""
        if not counts[0] and not counts[1]:
            return None
        if self._listener is None:
            self._listen()
        if not self._listener:
            return None             # cannot answer takers: offer nothing
        entry = self._free_entry_locked(offers)
        if entry is not None:       # else offers full: this database is not offered
            self._entries[khash] = entry
            offers[entry].hash = khash
        return entry

    def _free_entry_locked(self, offers):
        used = set(self._entries.values())
        for entry in range(ss.N_OFFER):
            if entry not in used:
                return entry
        for khash, entry in list(self._entries.items()):
            if self._counts.get(khash) == [0, 0]:
                del self._entries[khash]
                offers[entry].idle = offers[entry].in_use = 0
                return entry
        return None

    def _offers(self):
        """The offer cells of every process row ever used, in one read: a list of
        :class:`~.shared_state.Offer` rows one after the other (hash, idle, in use, ...)."""
        end = ss.Offer.BASE + self.state.header.rows * ss.N_OFFER * ss.Offer.WIDTH
        return self.state.cells[ss.Offer.BASE:end].tolist()

    def _entries_of(self, khash):
        """[(index in :meth:`_offers` of an entry of ``khash``, process row)], any process."""
        offers, found, start = self._offers(), [], 0
        while True:
            try:
                at = offers.index(khash, start)
            except ValueError:
                return offers, found
            start = at + 1
            if at % ss.Offer.WIDTH == _HASH:
                found.append((at, at // (ss.N_OFFER * ss.Offer.WIDTH)))

    def offered(self, khash):
        """[(idle count, donor row, donor pid)] of other processes offering ``khash``."""
        mine = self.budget.row
        offers, entries = self._entries_of(khash)
        found = []
        for at, row in entries:
            if offers[at + _IDLE] > 0 and row != mine:
                pid = self.state.process(row).pid
                if pid:
                    found.append((offers[at + _IDLE], row, pid))
        return found

    def elsewhere(self, khash):
        """(idle, in use) connections of ``khash`` in the other processes (one read)."""
        offers, entries = self._entries_of(khash)
        mine, idle, in_use = self.budget.row, 0, 0
        for at, row in entries:
            if row != mine:
                idle += offers[at + _IDLE]
                in_use += offers[at + _IN_USE]
        return idle, in_use

    def idle_totals(self):
        """{key hash: idle connections offered instance-wide} (this process's included)."""
        offers = self._offers()
        totals = {}
        for at in range(0, len(offers), ss.Offer.WIDTH):
            if offers[at + _IDLE] > 0:
                totals[offers[at + _HASH]] = totals.get(offers[at + _HASH], 0) + offers[at + _IDLE]
        return totals

    # ------------------------------------------------------------------ donor
    def _address(self, row, pid):
        return f'\0odoo-db_pooling-{self._tag}-{row}-{pid}'

    def _listen(self):
        """Start answering takers (lazily: the first time this process has an offer)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(self._address(self.budget.row, os.getpid()))
            listener.listen(16)
        except OSError as exc:
            listener.close()
            _logger.info('db_pooling: this process cannot offer its idle connections to the '
                         'others (%s); it opens its own', exc)
            self._listener = False
            return False
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), daemon=True,
                         name='db_pooling-exchange').start()
        return True

    def _serve(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return              # closed (fork, shutdown)
            try:
                with conn:
                    self._answer(conn)
            except BaseException:   # a taker that vanished, a bad request: serve the next
                _logger.debug('db_pooling exchange: request failed', exc_info=True)

    def _answer(self, conn):
        conn.settimeout(ACK_TIMEOUT)
        request = conn.recv(512)
        if len(request) < _REQUEST.size:
            return
        khash, taker_pid, row, serial = _REQUEST.unpack_from(request)
        if row != self.budget.row or peer(conn) != (taker_pid, os.geteuid()):
            conn.send(b'N')
            return
        for pool in list(self._pools):
            cnx = pool.sharing.lend_idle(khash)
            if cnx is not None:
                break
        else:
            conn.send(b'N')
            return
        acknowledged = promised = False
        fd = None
        try:
            if faults.plan:
                faults.hit('exchange.donor.after_lend')
            # (the taker names the session with its first statement: see session_tracking)
            meta = session_meta(cnx)
            # Our libpq is pointed at /dev/null while the session is away: it cannot
            # drive it, whatever happens here; it gets it back if the taker does not.
            fd = os.dup(cnx.fileno())
            mark_in_flight(fd)
            neutralize(cnx)
            self.budget.promise(serial)         # token +s, before the descriptor leaves
            promised = True
            if faults.plan:
                faults.hit('exchange.donor.after_promise')
            socket.send_fds(conn, [b'Y' + json.dumps(meta).encode()], [fd])
            if faults.plan:
                faults.hit('exchange.donor.after_send')
            acknowledged = conn.recv(1) == b'A'
        except (OSError, psycopg2.Error):
            pass
        finally:
            # Settled once for both sides: acknowledged means the token reads -s.
            given = False
            try:
                if faults.plan:
                    faults.hit('exchange.donor.before_settle')
            finally:
                try:
                    if promised:
                        given = acknowledged or self._settle(serial)
                    if fd is not None and not given:
                        os.dup2(fd, cnx.fileno(), inheritable=False)    # ours again
                finally:
                    if fd is not None:
                        IN_FLIGHT.pop(fd, None)
                        os.close(fd)
                    pool.sharing.lent(cnx, given)

    def _settle(self, serial):
        """:meth:`SharedBudget.settle`, retried: a donor that cannot read the token must
        not take the session back. If it never can, the session is given up (dropped:
        a late taker may still take it with its slot)."""
        for attempt in range(3):
            try:
                return self.budget.settle(serial)
            except Exception:       # noqa: BLE001 - the lock failed
                _logger.warning('db_pooling exchange: settling a hand-over failed', exc_info=True)
                time.sleep(0.01 * (attempt + 1))
        return True

    # ------------------------------------------------------------------ taker
    def take(self, khash, key, factory, claim=None):
        """A connection to ``key`` taken from another process's idle ones, with the
        donor's bookkeeping (``born``, ``expires``, ``reuses``), or None.

        ``claim``: a list the caller keeps; whatever is raised, it then says what this
        process holds (``[connection, meta, True]``: the session and its slot, to be
        closed like any connection of ours; empty: nothing)."""
        offers = self.offered(khash)
        if not offers:
            return None
        offers.sort(reverse=True)
        now = time.monotonic()
        offers = [offer for offer in offers if self._slow.get(offer[2], 0) < now]
        claim = [] if claim is None else claim
        for _count, row, pid in offers[:2]:
            got = self._take_from(row, pid, khash, key, factory, claim)
            if got is not None:
                return got
        return None

    def _take_from(self, row, pid, khash, key, factory, claim):
        serial = random.getrandbits(62) + 1
        fds = ()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(REPLY_TIMEOUT)
            try:
                try:
                    conn.connect(self._address(row, pid))
                    if peer(conn) != (pid, os.geteuid()):
                        return None     # not the process that published the offer
                    conn.send(_REQUEST.pack(khash, os.getpid(), row, serial))
                    message, fds = recv_fds(conn, 65536)
                except socket.timeout:
                    now = time.monotonic()  # forget donors skipped long enough (gone ones too)
                    self._slow = {slow: until for slow, until in self._slow.items()
                                  if until > now}
                    self._slow[pid] = now + SKIP_SLOW_DONOR
                    return None
                except OSError:
                    return None
                if not fds:
                    return None
                if faults.plan:
                    faults.hit('exchange.taker.after_receive')
                try:
                    meta = json.loads(message[1:])
                    meta['params'] = [tuple(param) for param in meta['params']]  # as parked
                    cnx = self.wrap(fds[0], meta, key, factory, khash)
                except Exception as exc:
                    _logger.info('db_pooling: could not take over an idle connection of '
                                 'process %s (%s); opening one', pid, exc)
                    return None
                claim[:] = [cnx, meta, False]
                if faults.plan:
                    faults.hit('exchange.taker.after_wrap')
                if not self.budget.take_slot(row, pid, serial, claim):
                    drop_copy(cnx)  # the donor settled first and kept it: never ours
                    del claim[:]    # (after: until dropped, the claim says so)
                    return None
                if faults.plan:
                    faults.hit('exchange.taker.after_take_slot')
                try:
                    conn.send(b'A')
                except OSError:
                    pass            # the donor reads the token
                if faults.plan:
                    faults.hit('exchange.taker.after_ack')
                return cnx, meta
            except BaseException:
                if claim and not claim[2]:
                    drop_copy(claim[0])     # not taken: the donor keeps it (token not -s)
                    del claim[:]
                raise               # taken: the caller closes it with its slot
            finally:
                for fd in fds:      # the received copy (a wrapped connection has its own)
                    IN_FLIGHT.pop(fd, None)
                    os.close(fd)

    def wrap(self, fd, meta, key, factory, khash):
        """A psycopg2 connection over ``fd``: a shell (see :meth:`keep_shell`) with the
        same session parameters, else a new one whose libpq start-up is answered here
        with the donor's session parameters; then the real socket replaces the fake one.
        ``fd`` stays the caller's to close (wrapped: the connection has its own copy)."""
        cnx = self._shell(khash, meta['params'])
        if cnx is None:
            cnx = self._stand_in(meta, key, factory)
        try:
            os.dup2(fd, cnx.fileno(), inheritable=False)
        except BaseException:
            drop_copy(cnx)
            raise
        return cnx

    def keep_shell(self, cnx):
        """Drop our copy of a connection given to another process, keeping its psycopg2
        object, if a take made it, to take the next connection to its database into:
        that saves the stand-in start-up (a thread, libpq's connection set-up), most of
        a take's cost. Only objects a take made: their cancel key is 0 and their address
        the stand-in's, so nothing in them reaches the session they held."""
        neutralize(cnx)
        khash = cnx.pooled.khash
        if cnx.pooled.shell and khash and not cnx.closed:
            with self._lock:
                shells = self._shells.setdefault(khash, [])
                if len(shells) < MAX_SHELLS and self._n_shells < MAX_SHELLS_TOTAL:
                    shells.append(cnx)
                    self._n_shells += 1
                    return
        cnx.close()

    def _shell(self, khash, params):
        """A kept shell of ``khash`` whose libpq holds the same session parameters as
        the connection coming in, its client-side settings back to a new one's; None
        if there is none."""
        with self._lock:
            shells = self._shells.get(khash)
            cnx = shells.pop() if shells else None
            self._n_shells -= cnx is not None
        if cnx is None:
            return None
        try:
            # What its libpq holds: the parameters of the sessions it held (all equal,
            # and a clean session's stay as they started), its name set apart (``pooled.app``).
            view = cnx.pooled.params
            if view is None:
                view = session_params(cnx)
            if view != params:
                raise ValueError('other session parameters')
            cnx.autocommit = False              # no round trip outside a transaction
            restore_characteristics(cnx)
            del cnx.notices[:], cnx.notifies[:]
        except Exception:                       # noqa: BLE001 - a new one instead
            cnx.close()                         # its socket is /dev/null
            return None
        return cnx

    def _stand_in(self, meta, key, factory):
        """A new psycopg2 connection whose start-up a thread of this process answers
        with the donor's session parameters."""
        params = meta['params'] + [('application_name', meta['app'])] if meta['app'] \
            else meta['params']
        reply = _startup_reply(params, meta['pid'])
        items = dict(key)
        kwargs = {'dbname': items.get('database', ''), 'user': items.get('user', '')}
        with self._wrap_lock:
            # Unpredictable: abstract names are visible to every local user, and one
            # who connected first would make our libpq wait (see _serve_startup).
            name = f'db_pooling-take-{secrets.token_hex(12)}'
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(f'\0{name}/.s.PGSQL.5432')
                listener.listen(8)
                served = []
                thread = threading.Thread(target=_serve_startup, args=(listener, reply, served),
                                          daemon=True, name='db_pooling-exchange-startup')
                thread.start()
                try:
                    cnx = psycopg2.connect(host='@' + name, port=5432, connection_factory=factory,
                                           connect_timeout=2, **_FAKE_OPTIONS, **kwargs)
                finally:
                    thread.join(2.0)
                    for end in served:
                        end.close()
            finally:
                listener.close()
        cnx.__class__ = shell_class(type(cnx))      # its cancel() and info are the pool's
        ensure_record(cnx).shell = True     # (a factory without SessionTracking: none yet)
        return cnx


def session_meta(cnx):
    """What a process taking ``cnx`` over needs: the session's parameters but its name
    (``params``, as :func:`session_params`), its name now and at start-up (``app``,
    ``app0``: see session_tracking), backend pid and the pool's bookkeeping."""
    record = cnx.pooled
    if record.params is None:
        record.params = session_params(cnx)
    return record.meta()


def session_params(cnx):
    """The session parameters libpq holds for ``cnx``, its name left out."""
    info = cnx.info
    return [(name, value) for name in REPORTED if name != 'application_name'
            for value in [info.parameter_status(name)] if value is not None]


def neutralize(cnx):
    """Point our copy of a socket another process also holds (a forked child's, a
    connection given away) at /dev/null, so that closing it, or libpq's goodbye,
    leaves the server session alone."""
    if cnx.closed:
        return
    os.dup2(_devnull(), cnx.fileno())


_DEVNULL = [None, None]     # descriptor, (device, inode)


def _devnull():
    """A descriptor of /dev/null kept open (shared with forked children: it is the same
    for all), checked, so that code closing descriptors it does not own cannot make us
    copy another file over a socket."""
    fd = _DEVNULL[0]
    if fd is not None:
        try:
            stat = os.fstat(fd)
            if (stat.st_rdev, stat.st_ino) == _DEVNULL[1]:
                return fd
        except OSError:
            pass
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    stat = os.fstat(fd)
    _DEVNULL[:] = fd, (stat.st_rdev, stat.st_ino)
    return fd


def drop_copy(cnx):
    """Close our psycopg2 connection without ending its server session."""
    neutralize(cnx)
    cnx.close()


# Options of the fake start-up: every one libpq would otherwise read from the
# environment and that matters is given (PGHOSTADDR would send the start-up elsewhere,
# PGSSLNEGOTIATION=direct or PGREQUIREAUTH would make it fail), so that a service file
# (PGSERVICE) can only fill in options without effect here. No password is ever asked:
# the start-up is answered with AuthenticationOk.
_FAKE_OPTIONS = {'hostaddr': '', 'options': '', 'requirepeer': '', 'sslmode': 'disable', 'gssencmode': 'disable', 'channel_binding': 'disable',
                 'target_session_attrs': 'any', 'keepalives': '0', 'tcp_user_timeout': '0'}
if psycopg2.extensions.libpq_version() >= 160000:
    _FAKE_OPTIONS.update(require_auth='none', load_balance_hosts='disable')
if psycopg2.extensions.libpq_version() >= 170000:
    _FAKE_OPTIONS['sslnegotiation'] = 'postgres'


def _startup_reply(params, pid):
    """AuthenticationOk, the parameters, BackendKeyData, ReadyForQuery (idle)."""
    out = [b'R' + struct.pack('!ii', 8, 0)]
    for name, value in params:
        body = name.encode() + b'\0' + value.encode() + b'\0'
        out.append(b'S' + struct.pack('!i', 4 + len(body)) + body)
    out.append(b'K' + struct.pack('!iii', 12, pid, 0))
    out.append(b'Z' + struct.pack('!i', 5) + b'I')
    return b''.join(out)


def _recv_exact(sock, size):
    data = b''
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError('libpq closed the start-up connection')
        data += chunk
    return data


def _serve_startup(listener, reply, served):
    """Answer our own libpq's start-up (SSL or GSS encryption requests refused) with
    ``reply``; anyone else who connects is hung up on, and we wait on."""
    deadline = time.monotonic() + 2.0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        listener.settimeout(remaining)
        try:
            end, _ = listener.accept()
        except OSError:
            return
        served.append(end)
        if peer(end)[0] == os.getpid():
            break
        end.close()                 # only our own libpq gets the donor's parameters
    try:
        end.settimeout(2.0)
        while True:
            (length,) = struct.unpack('!i', _recv_exact(end, 4))
            body = _recv_exact(end, length - 4)
            if struct.unpack('!i', body[:4])[0] in (_SSL_REQUEST, _GSS_REQUEST):
                end.sendall(b'N')
                continue
            end.sendall(reply)
            return
    except (OSError, EOFError):
        return
