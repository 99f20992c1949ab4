"""The shared-memory segment every process of one Odoo instance attaches to.

A fixed-size file (under /dev/shm by default, or ``db_pool_shared_path`` on a
volume shared by several containers) mapped with ``mmap(MAP_SHARED)`` and
read as one flat array of signed 64-bit integers. Forked workers inherit the
mapping; the gevent process (a separate interpreter) and other containers
open the same file by path.

Layout (indexes into the int64 array)::

    header   80 cells         magic, version, budget, cron reserve, ticket counter, ...,
                              database list generation (cell 10), rows ever used (cell 11),
                              then the counters of reaped processes, per role
    process  N_PROC rows      pid, start time, role, held, in use, idle, long-lived,
                              shedding, last idle connection given away, parking family,
                              counters[N_COUNTERS]
    waiter   N_WAIT rows      pid, process row, priority, ticket, state, since (ms)
    history  N_HIST samples   time (ms), held, in use, idle, waiting, long-lived
    detail   N_PROC rows      pid, since (wall ms), then bytes: the database and the
                              borrow site of the process's longest current borrow
    servers  4 cells + N_SRV rows   probe lease (pid, start, until ms), then per server
                              (primary first, then replicas): identity, kind, weight,
                              banned until, failures, probe time, replay LSN, lag, counters
    offers   N_PROC rows      per process, N_OFFER triples (database key hash, idle
                              connections, connections in use): what it can give to another
                              process, and what it will give back soon (see exchange)
    lots     N_LOT rows       parking lots (see parking): owner token, database key hash,
                              connections parked, change counter, last two demands
    outages  N_OUT rows       per server: identity, down since, prober and its lease,
                              last error kind, restarts seen, reached once, postmaster
                              start time (see outage)

Each region has a small class, a :class:`Row` subclass, that names its fields (``Header``,
``Process``, ``Waiter``, ``Sample``, ``Detail``, ``Lease``, ``Server``, ``Offer``, ``Lot``,
``Outage``): ``lot.count += 1`` rather than ``cells[LOT_BASE + i * K_FIELDS + K_COUNT] += 1``;
the offsets below are the layout they read.

With N_PROC = 512, N_WAIT = 1024, N_HIST = 720 (one sample per 5 s for
an hour), N_SRV = 16, N_OFFER = 8, N_LOT = 32 and N_OUT = 16 the segment is
372,640 bytes, whatever the budget: 1,024 connections need at most 1,024
waiter rows, and one row per process.

Every change is made under :meth:`SharedState.locked`: a thread lock (for the
threads of one process) plus ``lockf`` on the file's first byte (for
processes). The kernel drops a ``lockf`` lock when its holder dies, even by
SIGKILL, so a crash never deadlocks the others; rows of dead processes are then
reclaimed by :meth:`SharedState.reap`. Values written by a process about itself
only (its in-use and idle counts) are written without the lock.

Which rows belong to live processes: each process holds, for as long as it
lives, an open-file-description lock (``F_OFD_SETLK``) on one byte past the end
of the file, ``LIVE_BASE`` + its row, through a descriptor of its own (a forked
child closes the copy it inherits). The kernel drops it when the process dies,
whatever PID namespace or container it runs in, so a row is reaped only when
its byte can be locked: pids, meaningless across containers sharing a file
through ``db_pool_shared_path``, are only shown, never trusted. Where such
locks do not exist (not 64-bit Linux) liveness falls back to ``/proc/<pid>``
and its start time, which holds within one PID namespace.

The file is created with ``O_EXCL | O_NOFOLLOW`` at mode 0600, by default in
a directory of its own (``/dev/shm/odoo-db_pooling-<uid>``, mode 0700), and
is opened only if it is a regular file of this user, not readable nor writable
by anyone else, with one link, and holding this format or being empty: another
local user can neither make Odoo write through a symbolic link nor attach to,
read, or truncate (SIGBUS) the segment. Anything else stops with
:class:`SharedStateError`, which names the path, what is wrong and what to do.
"""
import errno
import fcntl
import hashlib
import mmap
import os
import platform
import stat
import struct
import tempfile
import threading
import time
import weakref

from .. import after_fork

MAGIC = 0x6462706F6F6C3031      # "dbpool01"
VERSION = 11         # bump on any layout or protocol change: older files are reinitialised
                     # once no process of theirs is alive (9: liveness locks, token;
                     # 10: outage rows; 11: hand-over metadata carries the session's
                     # start-up name, a take request no name)

N_PROC = 512
N_WAIT = 1024
N_HIST = 720
N_COUNTERS = 10
N_OFFER = 8
O_FIELDS = 3     # offer entry: key hash, idle, in use

# header cells
H_MAGIC, H_VERSION, H_BUDGET, H_CRON_RESERVE, H_TICKET, H_WAITING, H_LAST_REAP, \
    H_HIST_POS, H_HIST_LAST, H_MIN_IDLE, H_DB_LIST_GEN, H_ROWS, H_PARKED, H_BELL = range(14)
# H_PARKED: connections parked in the kernel queues (see parking): they hold budget slots
# that belong to no process
# H_BELL: the maintenance threads' doorbell (see doorbell), rung when a borrower starts
# waiting for the budget
H_OUTAGES = 14          # outage rows down (see outage): borrowers look before taking a slot
H_REAPED = 16           # + role * N_COUNTERS + counter: totals of processes that are gone
HEADER = 80

# process row fields
P_PID, P_START, P_ROLE, P_HELD, P_IN_USE, P_IDLE, P_LONG, P_SHEDDING, P_GIVEN, \
    P_FAMILY = range(10)
# P_FAMILY: the token of the parking queues the process holds (see parking): a lot whose
# family has no live process left has no queue any more, its counts are freed.
P_COUNTERS = 10
P_FIELDS = P_COUNTERS + N_COUNTERS
COUNTERS = ('borrows', 'waits', 'timeouts', 'opened', 'closed', 'reused', 'shed', 'reaped',
            'taken', 'unparked')

# waiter row fields and states
W_PID, W_PROC, W_PRIORITY, W_TICKET, W_STATE, W_SINCE = range(6)
W_FIELDS = 6
FREE, WAITING, GRANTED = 0, 1, 2

# history sample fields
S_TIME, S_HELD, S_IN_USE, S_IDLE, S_WAITING, S_LONG = range(6)
S_FIELDS = 6

# detail row (one per process row, for the dashboard): two cells, then text bytes
D_PID, D_SINCE = range(2)
D_DATABASE_BYTES, D_SITE_BYTES = 48, 136
D_FIELDS = 2 + (D_DATABASE_BYTES + D_SITE_BYTES) // 8

PROC_BASE = HEADER
WAIT_BASE = PROC_BASE + N_PROC * P_FIELDS
HIST_BASE = WAIT_BASE + N_WAIT * W_FIELDS
DETAIL_BASE = HIST_BASE + N_HIST * S_FIELDS
SRV_BASE = DETAIL_BASE + N_PROC * D_FIELDS

# servers region (replica routing, see replica_health): a lease, then one row per server
N_SRV = 16
L_PID, L_START, L_UNTIL = range(3)
SRV_LEASE = 4
V_IDENT, V_KIND, V_WEIGHT, V_BANNED_UNTIL, V_FAILURES, V_PROBED, V_PROBE_OK, V_REPLAY_LSN, \
    V_LAG_BYTES, V_LAG_MS, V_READS, V_WRITES = range(12)
V_FALLBACKS = 12        # + reason index (replicas.REASONS)
V_CONNS = 16            # client backends of our database user on that server (last probe)
V_FIELDS = 20
SRV_ROWS = SRV_BASE + SRV_LEASE
OFFER_BASE = SRV_ROWS + N_SRV * V_FIELDS
LOT_BASE = OFFER_BASE + N_PROC * N_OFFER * O_FIELDS

# parking lot rows (see parking)
N_LOT = 32
K_OWNER, K_HASH, K_COUNT, K_SEQ, K_WANT_MS, K_WANT_PID, K_OTHER_MS, K_FREE_MS = range(8)
K_FIELDS = 8
OUT_BASE = LOT_BASE + N_LOT * K_FIELDS

# outage rows (see outage): one per server connections are opened to
N_OUT = 16
U_IDENT, U_DOWN, U_PROBER, U_UNTIL, U_ERROR, U_GEN, U_REACHED, U_STARTED = range(8)
U_FIELDS = 8
CELLS = OUT_BASE + N_OUT * U_FIELDS
SIZE = CELLS * 8

ROLES = ('master', 'http', 'cron', 'gevent', 'threaded', 'other')


def _field(offset):
    """The attribute of a :class:`Row` that reads and writes the cell at ``offset``."""
    def get(self):
        return self.cells[self.start + offset]

    def put(self, value):
        self.cells[self.start + offset] = value
    return property(get, put)


class Row:
    """A view of one row of a region of the segment: one attribute per field, reading or
    setting it reads or writes that cell (under the rules of the module's docstring: a
    change under :meth:`SharedState.locked` but for what a process writes about itself).

    A subclass describes one region: ``BASE`` (its first cell), ``COUNT`` rows of
    ``WIDTH`` cells, ``FIELDS`` ({name: offset in the row}); cells of a row past the named
    fields are arrays its methods read (a process row's counters)."""
    __slots__ = ('cells', 'index', 'start')
    BASE = COUNT = WIDTH = 0
    FIELDS = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, offset in cls.FIELDS.items():
            setattr(cls, name, _field(offset))

    def __init__(self, cells, index, base=None):
        self.cells = cells
        self.index = index
        self.start = (self.BASE if base is None else base) + index * self.WIDTH

    def cell(self, name):
        """The index in ``cells`` of this row's field ``name``."""
        return self.start + self.FIELDS[name]

    @classmethod
    def all(cls, cells, count=None, base=None):
        """A view of each of the first ``count`` rows (all of them by default); ``base``:
        the region starts there in ``cells`` instead (a process's own copy of it)."""
        return [cls(cells, index, base) for index in range(cls.COUNT if count is None else count)]

    @classmethod
    def column(cls, cells, name, count=None):
        """Field ``name`` of the first ``count`` rows (all by default), one cell per row."""
        return cells[cls.columns(name, count)]

    @classmethod
    def columns(cls, name, count=None):
        """The ``slice`` of ``cells`` that :meth:`column` reads (to keep, on hot paths)."""
        end = cls.BASE + (cls.COUNT if count is None else count) * cls.WIDTH
        return slice(cls.BASE + cls.FIELDS[name], end, cls.WIDTH)

    def clear(self):
        """Zero the row (a freed process, waiter or lot)."""
        clear(self.cells, self.start, self.WIDTH)

    def values(self):
        return tuple(self.cells[self.start:self.start + self.WIDTH])


class Header(Row):
    """The header: one row of HEADER cells at the start of the file; after the named
    fields, the counters of reaped processes per role (:meth:`reaped`)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = 0, 1, HEADER
    FIELDS = dict(magic=H_MAGIC, version=H_VERSION, budget=H_BUDGET,
                  cron_reserve=H_CRON_RESERVE, ticket=H_TICKET, waiting=H_WAITING,
                  last_reap=H_LAST_REAP, hist_pos=H_HIST_POS, hist_last=H_HIST_LAST,
                  min_idle=H_MIN_IDLE, db_list_gen=H_DB_LIST_GEN, rows=H_ROWS,
                  parked=H_PARKED, bell=H_BELL, outages=H_OUTAGES)

    def __init__(self, cells, index=0, base=None):
        super().__init__(cells, index, base)

    def reaped(self, role_index):
        """Offset of the reaped processes' counters of a role (N_COUNTERS cells)."""
        return H_REAPED + role_index * N_COUNTERS


class Process(Row):
    """A process row; after the named fields, its counters (COUNTERS, :meth:`counter`)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = PROC_BASE, N_PROC, P_FIELDS
    FIELDS = dict(pid=P_PID, started=P_START, role=P_ROLE, held=P_HELD, in_use=P_IN_USE,
                  idle=P_IDLE, long_lived=P_LONG, shedding=P_SHEDDING, given=P_GIVEN,
                  family=P_FAMILY)

    def counter(self, name):
        """The cell index of counter ``name`` (one of COUNTERS)."""
        return self.start + P_COUNTERS + COUNTERS.index(name)

    def counters(self):
        return self.cells[self.start + P_COUNTERS:self.start + P_COUNTERS + N_COUNTERS]


class Waiter(Row):
    """A borrower of some process waiting for a budget slot (``state``: FREE, WAITING,
    GRANTED)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = WAIT_BASE, N_WAIT, W_FIELDS
    FIELDS = dict(pid=W_PID, proc=W_PROC, priority=W_PRIORITY, ticket=W_TICKET,
                  state=W_STATE, since=W_SINCE)


class Sample(Row):
    """One history sample (every 5 s, an hour of them in a ring)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = HIST_BASE, N_HIST, S_FIELDS
    FIELDS = dict(time=S_TIME, held=S_HELD, in_use=S_IN_USE, idle=S_IDLE,
                  waiting=S_WAITING, long_lived=S_LONG)


class Lease(Row):
    """The replica probe's lease, before the server rows (see replica_health)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = SRV_BASE, 1, SRV_LEASE
    FIELDS = dict(pid=L_PID, started=L_START, until=L_UNTIL)

    def __init__(self, cells, index=0, base=None):
        super().__init__(cells, index, base)


class Server(Row):
    """A database server's row for replica routing (see replica_health); after the named
    fields, the fallback counters per reason (:meth:`fallback`)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = SRV_ROWS, N_SRV, V_FIELDS
    FIELDS = dict(ident=V_IDENT, kind=V_KIND, weight=V_WEIGHT, banned_until=V_BANNED_UNTIL,
                  failures=V_FAILURES, probed=V_PROBED, probe_ok=V_PROBE_OK,
                  replay_lsn=V_REPLAY_LSN, lag_bytes=V_LAG_BYTES, lag_ms=V_LAG_MS,
                  reads=V_READS, writes=V_WRITES, conns=V_CONNS)

    def fallback(self, reason_index):
        """The cell index of the fallback counter of a reason."""
        return self.start + V_FALLBACKS + reason_index


class Offer(Row):
    """One of a process's N_OFFER offers (see exchange): row ``process * N_OFFER + entry``."""
    __slots__ = ()
    BASE, COUNT, WIDTH = OFFER_BASE, N_PROC * N_OFFER, O_FIELDS
    FIELDS = dict(hash=0, idle=1, in_use=2)

    @classmethod
    def of_process(cls, cells, process):
        """The offers of process row ``process``."""
        return [cls(cells, process * N_OFFER + entry) for entry in range(N_OFFER)]


class Detail(Row):
    """A process's longest current borrow, for the dashboard: two cells, then its database
    and borrow site as bytes (from :meth:`text_offset`)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = DETAIL_BASE, N_PROC, D_FIELDS
    FIELDS = dict(pid=D_PID, since=D_SINCE)

    def text_offset(self):
        """The byte offset in the file of the row's text, after its two cells."""
        return (self.start + 2) * 8


class Lot(Row):
    """A parking lot (see parking)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = LOT_BASE, N_LOT, K_FIELDS
    FIELDS = dict(owner=K_OWNER, hash=K_HASH, count=K_COUNT, seq=K_SEQ, want_ms=K_WANT_MS,
                  want_pid=K_WANT_PID, other_ms=K_OTHER_MS, free_ms=K_FREE_MS)


class Outage(Row):
    """A server's outage row (see outage)."""
    __slots__ = ()
    BASE, COUNT, WIDTH = OUT_BASE, N_OUT, U_FIELDS
    FIELDS = dict(ident=U_IDENT, down=U_DOWN, prober=U_PROBER, until=U_UNTIL, error=U_ERROR,
                  gen=U_GEN, reached=U_REACHED, started=U_STARTED)


def server_ident(name):
    """A stable non-zero 62-bit identity of a server (``host:port``), stored in its
    shared rows (replica health, outages) to notice that a row is another server's."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], 'big') >> 2 or 1


def clear(cells, start, count):
    """Zero ``count`` cells from ``start`` (a freed process or waiter row)."""
    cells[start:start + count] = memoryview(bytes(count * 8)).cast('q')


def _clear_offers(cells, process):
    """Zero the offers of process row ``process`` (a freed or new row)."""
    clear(cells, OFFER_BASE + process * N_OFFER * O_FIELDS, N_OFFER * O_FIELDS)


class SharedStateError(RuntimeError):
    """The shared state file cannot be used safely; the message says why and what to do."""


def private_directory():
    """The directory of this user's default state files: ``/dev/shm/odoo-db_pooling-<uid>``
    (the temporary directory where there is no /dev/shm), mode 0700."""
    base = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
    return os.path.join(base, f'odoo-db_pooling-{os.geteuid()}')


def default_path(*identity):
    """Segment path for an instance identified by ``identity`` (config file, db host, port...)."""
    digest = hashlib.sha1(repr(identity).encode()).hexdigest()[:16]
    return os.path.join(private_directory(), f'state-{digest}')


_ADVICE = ('If another user made it, remove it as root; if it is your own leftover and no '
           'Odoo uses it, remove it; else (another instance\'s file: odoo-pool top as its '
           'user) set db_pool_shared_path to a file in a directory only Odoo\'s user can '
           'write (or db_pool_shared = off).')


def _check_directory(path):
    """The directory of the state file: ours (created 0700 for the default one), or root's;
    not writable by others unless sticky (there, a file of theirs is refused below)."""
    directory = os.path.dirname(os.path.abspath(path))
    private = directory == private_directory()
    uid = os.geteuid()
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        if not private:
            raise SharedStateError(f'db_pooling cannot open its shared state file {path}: '
                                   f'the directory {directory} does not exist. Create it (mode '
                                   f'0700, owned by Odoo\'s user), or set db_pool_shared_path '
                                   f'to a writable absolute path (or db_pool_shared = off).'
                                   ) from None
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
    what = None
    if not stat.S_ISDIR(info.st_mode):
        what = 'is not a directory (a symbolic link or a file put there by someone else?)'
    elif private and (info.st_uid != uid or info.st_mode & 0o077):
        what = (f'is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}, '
                f'not private to this user (uid {uid}, mode 0700)'
                + (' (another user made it first: remove it as root, or set '
                   'db_pool_shared_path)' if info.st_uid != uid else ''))
    elif info.st_uid not in (uid, 0):
        what = f'belongs to uid {info.st_uid}, neither this user (uid {uid}) nor root'
    elif info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        what = (f'is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}) and not '
                f'sticky: they could replace the file')
    if what:
        raise SharedStateError(f'db_pooling: refusing the shared state directory {directory}: '
                               f'it {what}. {_ADVICE}')


def _open_file(path, create):
    """A descriptor of the state file, safe from symbolic links and other users' files;
    (fd, created)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    for _attempt in range(5):
        try:
            if create:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    os.fchmod(fd, 0o600)        # exactly, whatever the umask
                    return fd, True
                except FileExistsError:
                    pass
            return os.open(path, flags), False
        except FileNotFoundError:
            if not create:
                raise SharedStateError(f'db_pooling: no shared state file at {path} (is the '
                                       f'instance running, with this db_pool_shared_path?)') from None
            continue                            # removed between the two opens: again
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SharedStateError(f'db_pooling: refusing the shared state file {path}: it '
                                       f'is a symbolic link, which db_pooling never follows. '
                                       f'{_ADVICE}') from None
            raise SharedStateError(f'db_pooling cannot open its shared state file {path} '
                                   f'({exc.strerror}): set db_pool_shared_path to a writable '
                                   f'absolute path, or db_pool_shared = off.') from None
    raise SharedStateError(f'db_pooling: the shared state file {path} keeps disappearing')


def _refuse_if_in_use(fd, path, version, size):
    """A file of another version is reformatted only if none of its processes is alive:
    version 8 had this layout of process rows, judged alive by /proc (the others are
    older than anything that could still run)."""
    if version != 8 or size < PROC_BASE * 8 + N_PROC * P_FIELDS * 8:
        return
    data = os.pread(fd, N_PROC * P_FIELDS * 8, PROC_BASE * 8)
    rows = memoryview(data).cast('q')
    alive = [rows[row * P_FIELDS + P_PID] for row in range(N_PROC)
             if rows[row * P_FIELDS + P_PID] and
             process_start(rows[row * P_FIELDS + P_PID]) == rows[row * P_FIELDS + P_START]]
    if alive:
        raise SharedStateError(
            f'db_pooling: the shared state file {path} is in use by processes of an older '
            f'db_pooling version (pids {", ".join(map(str, alive[:8]))}): stop them first, '
            f'as one budget cannot be shared across versions.')


def _check_file(fd, path):
    info = os.fstat(fd)
    uid = os.geteuid()
    what = None
    if not stat.S_ISREG(info.st_mode):
        what = 'is not a regular file'
    elif info.st_uid != uid:
        what = f'belongs to uid {info.st_uid}, not to this user (uid {uid})'
    elif info.st_mode & 0o077:
        what = (f'has mode {stat.S_IMODE(info.st_mode):04o}: other users may read or write '
                f'it (expected 0600)')
    elif info.st_nlink != 1:
        what = f'has {info.st_nlink} hard links: it may be reachable from elsewhere'
    if what:
        raise SharedStateError(f'db_pooling: refusing the shared state file {path}: it {what}. '
                               f'{_ADVICE}')
    return info


# ------------------------------------------------------------------ process liveness
# struct flock of 64-bit Linux (x86-64, arm64): type, whence, start, len, pid.
_FLOCK = struct.Struct('@hhqqi4x')
OFD_LOCKS = (hasattr(fcntl, 'F_OFD_SETLK') and struct.calcsize('P') == 8
             and platform.system() == 'Linux')
LIVE_BASE = 1 << 32     # byte LIVE_BASE + row: locked by the process of that row while it lives


def _row_lock(fd, command, kind, row):
    """fcntl(F_OFD_*) on the liveness byte of ``row``; the l_type the kernel answers."""
    answer = fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, LIVE_BASE + row, 1, 0))
    return _FLOCK.unpack(answer)[0]


class _Rows:
    """The process row this process holds in one state file, shared by the
    :class:`SharedState` objects of that file in this process, with the descriptor
    whose open-file-description lock keeps the row alive."""
    __slots__ = ('pid', 'row', 'fd', 'was', 'users')

    def __init__(self):
        self.pid, self.row, self.fd, self.was, self.users = os.getpid(), None, None, None, 0

    def opened(self, fd):
        self.fd, self.was = fd, after_fork.identity(fd)

    def drop(self, inherited=False):
        """Close the descriptor (out of the books first: a fork meanwhile must not find a
        closed number here). ``inherited``: in a forked child, our copy of the parent's,
        closed only if it still is that file (the parent's lock stays)."""
        fd, self.fd, self.row = self.fd, None, None
        if fd is None:
            return
        if inherited:
            after_fork.close_inherited(fd, self.was)
            return
        try:
            os.close(fd)
        except OSError:
            pass


_rows = {}          # (st_dev, st_ino) -> _Rows of this process
_states = weakref.WeakSet()


def _after_fork_in_child():
    # The inherited descriptors share the parent's locks: closing our copies leaves
    # them to the parent; the child takes a row of its own when it registers.
    for rows in _rows.values():
        rows.drop(inherited=True)
    _rows.clear()
    for state in list(_states):
        state.after_fork_in_child()


after_fork.register('shared_state', _after_fork_in_child)


def process_start(pid):
    """Start time of ``pid`` in clock ticks (from /proc), or None if it is gone or a zombie."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b')') + 2:].split()
    if fields[0] in (b'Z', b'X'):
        return None
    return int(fields[19])


def _fixed(text, size, keep_end=False):
    """``text`` as exactly ``size`` bytes of UTF-8, NUL padded; cut at the start if
    ``keep_end`` (a file path's end says most), else at the end."""
    data = text.encode('utf-8', 'replace')
    if len(data) > size:
        data = data[-size:] if keep_end else data[:size]
    return data.ljust(size, b'\0')


def _text(raw):
    return raw.rstrip(b'\0').decode('utf-8', 'replace').lstrip('\ufffd')


class _Locked:
    """The context of :meth:`SharedState.locked`: a class rather than a generator, as it
    is entered twice per parked connection (see parking), a hot path."""
    __slots__ = ('state',)

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        # An exception raised by a signal handler as a C call returns (acquire, lockf)
        # must not leave either lock held: whoever owns the thread lock undoes both (an
        # unlock of a byte not locked is a no-op).
        state = self.state
        lock = state._thread_lock
        try:
            lock.acquire()
            fcntl.lockf(state.fd, fcntl.LOCK_EX, 1)    # byte 0 (rows' bytes are apart)
        except BaseException:
            if lock._is_owned():
                try:
                    fcntl.lockf(state.fd, fcntl.LOCK_UN, 1)
                finally:
                    lock.release()
            raise
        return state.cells

    def __exit__(self, *exc_info):
        state = self.state
        try:
            fcntl.lockf(state.fd, fcntl.LOCK_UN, 1)
        finally:
            state._thread_lock.release()
        return False


class SharedState:
    """One attached segment. ``cells`` is the int64 view of the whole file."""

    _doorbell = False       # not looked for yet (see doorbell())

    def __init__(self, path, create=True):
        self.path = path
        self._thread_lock = threading.RLock()     # (for _is_owned: never re-entered)
        self._locked = _Locked(self)
        self._rows = None
        _check_directory(path)
        fd, _created = _open_file(path, create)
        try:
            info = _check_file(fd, path)
            self._inode = (info.st_dev, info.st_ino)
            fcntl.lockf(fd, fcntl.LOCK_EX, 1)
            try:
                self._attach(fd, path, create)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1)
        except BaseException:
            os.close(fd)    # (a file we created stays: empty or blank, the next start formats it)
            raise
        self.fd = fd
        _states.add(self)

    def _attach(self, fd, path, create):
        """Map the file (under the file lock), formatting it if it is empty, or ours of
        another version; anything else is refused."""
        size = os.fstat(fd).st_size
        magic, version = struct.unpack('=qq', os.pread(fd, 16, 0).ljust(16, b'\0'))
        current = size >= SIZE and magic == MAGIC and version == VERSION
        blank = size == 0 or (size >= SIZE and magic == 0 and version == 0)
        if not current and not (create and (blank or magic == MAGIC)):
            what = ('is not formatted yet' if blank else
                    'is of another db_pooling version' if magic == MAGIC else
                    'is not a db_pooling shared state file')
            raise SharedStateError(f'db_pooling: refusing the shared state file {path}: it '
                                   f'{what}. {_ADVICE}')
        if not current and not blank:
            _refuse_if_in_use(fd, path, version, size)
        if size < SIZE:             # (never shrunk: a process mapping more would SIGBUS)
            os.ftruncate(fd, SIZE)
        self.map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.cells = memoryview(self.map).cast('q')
        self.header = Header(self.cells)
        if not current:             # empty, or left by another version: format
            clear(self.cells, 0, CELLS)
            self.cells[H_VERSION] = VERSION
            self.cells[H_MAGIC] = MAGIC

    # ------------------------------------------------------------------ locking
    def locked(self):
        """``with state.locked() as cells:`` the change is made by this thread alone
        instance-wide."""
        return self._locked

    def after_fork_in_child(self):
        # lockf locks belong to a process, so the inherited descriptor is fine;
        # only the thread lock may have been held by a thread that is gone. The
        # parent's row is the parent's (see _after_fork_in_child).
        self._thread_lock = threading.RLock()     # (for _is_owned: never re-entered)
        self._locked = _Locked(self)
        if self._rows is not None and self._rows.pid != os.getpid():
            self._rows = None

    # ------------------------------------------------------------------ liveness
    def _my_rows(self):
        """This process's :class:`_Rows` of this file (made on first use)."""
        rows = self._rows
        if rows is None or rows.pid != os.getpid():
            rows = _rows.get(self._inode)
            if rows is None or rows.pid != os.getpid():
                rows = _rows[self._inode] = _Rows()
            rows.users += 1
            self._rows = rows
        return rows

    def _hold_row_shared_locked(self, row):
        """Lock ``row``'s liveness byte through a descriptor of this process's own; False
        if a live process holds it."""
        rows = self._my_rows()
        if not OFD_LOCKS:
            rows.row = row
            return True
        if rows.fd is None:
            try:    # a new open file description of the same file, not shared with the parent
                rows.opened(os.open(f'/proc/self/fd/{self.fd}', os.O_RDWR | os.O_CLOEXEC))
            except OSError:
                rows.opened(os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW))
            if (os.fstat(rows.fd).st_dev, os.fstat(rows.fd).st_ino) != self._inode:
                rows.drop()
                raise SharedStateError(f'db_pooling: the shared state file {self.path} was '
                                       f'replaced while in use; restart Odoo')
        try:
            _row_lock(rows.fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, row)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        if rows.row is not None and rows.row != row:
            _row_lock(rows.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, rows.row)
        rows.row = row
        return True

    def alive(self, row, cells=None):
        """Whether the process of ``row`` is alive (any PID namespace, see the module's
        docstring)."""
        process = Process(self.cells if cells is None else cells, row)
        if not process.pid:
            return False
        if not OFD_LOCKS:
            return process_start(process.pid) == process.started
        rows = self._rows
        if rows is not None and rows.pid == os.getpid() and rows.row == row:
            return True
        # Our main descriptor never holds a row lock, so any lock found is a live owner's.
        return _row_lock(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, row) != fcntl.F_UNLCK

    # ------------------------------------------------------------------ processes
    def process(self, row):
        """A view of process row ``row``."""
        return Process(self.cells, row)

    def register(self, role):
        """Claim a process row for this process; returns the row number."""
        pid, start = os.getpid(), process_start(os.getpid()) or 0
        with self.locked() as cells:
            self.reap_shared_locked(cells, force=True)
            mine = self._my_rows().row
            if mine is not None and Process(cells, mine).pid == pid:
                free = mine         # re-registering (same process): reuse the row
            else:
                free = None
                # (The column is not kept in a name: a traceback holding a view of the
                # mapping would make close() fail.)
                for row, owner in enumerate(Process.column(cells, 'pid')):
                    if owner == 0 and self._hold_row_shared_locked(row):
                        free = row
                        break
            if free is None:
                raise RuntimeError(f'db_pooling shared state {self.path} has no free process row '
                                   f'(all {N_PROC} in use)')
            process = Process(cells, free)
            same = free == mine
            held, family = (process.held, process.family) if same else (0, 0)
            process.clear()
            process.family = family
            process.pid = pid
            process.started = start
            process.role = ROLES.index(role) if role in ROLES else ROLES.index('other')
            process.held = held
            _clear_offers(cells, free)
            self.header.rows = max(self.header.rows, free + 1)
        return free

    def set_role(self, row, role):
        Process(self.cells, row).role = ROLES.index(role)

    def live_processes(self):
        """:meth:`processes` whose process is alive (not yet reaped ones left out)."""
        return [row for row in self.processes() if self.alive(row['row'])]

    def processes(self):
        """[dict] of the used process rows (for the dashboard, the CLI, tests)."""
        rows = []
        for row, pid in enumerate(Process.column(self.cells, 'pid')):
            if pid:
                process = Process(self.cells, row)
                rows.append({
                    'row': row, 'pid': pid, 'role': ROLES[process.role], 'held': process.held,
                    'in_use': process.in_use, 'idle': process.idle,
                    'long_lived': process.long_lived,
                    **dict(zip(COUNTERS, process.counters())),
                })
        return rows

    def counter_totals(self):
        """{role: {counter: total}} over live and reaped processes (never decreasing)."""
        cells, header = self.cells, self.header
        totals = {role: {name: cells[header.reaped(r) + i] for i, name in enumerate(COUNTERS)}
                  for r, role in enumerate(ROLES)}
        for row in self.processes():
            for name in COUNTERS:
                totals[row['role']][name] += row[name]
        return totals

    def total_held(self):
        """Slots held instance-wide: by the processes, and by parked connections."""
        header = self.header    # rows past header.rows were never used
        return sum(Process.column(self.cells, 'held', header.rows)) + header.parked

    def idle_total(self):
        """Idle connections instance-wide: published by the processes, and parked."""
        return sum(Process.column(self.cells, 'idle')) + self.header.parked

    def db_list_generation(self):
        """Changes whenever a process created or dropped a database (lock-free read)."""
        return self.header.db_list_gen

    def bump_db_list_generation(self):
        with self.locked():
            self.header.db_list_gen += 1

    # ------------------------------------------------------------------ crash recovery
    def reap(self, force=False, interval_ms=500):
        if not force and int(time.monotonic() * 1000) - self.header.last_reap < interval_ms:
            return 0                    # someone reaped recently: skip the lock
        with self.locked() as cells:
            return self.reap_shared_locked(cells, force)

    def reap_shared_locked(self, cells, force=False, interval_ms=500):
        """Free the rows (slots, waiters) of processes that died. Returns slots freed."""
        now = int(time.monotonic() * 1000)
        if not force and now - cells[H_LAST_REAP] < interval_ms:
            return 0                # (the common case, at every borrow: one index)
        header = self.header
        header.last_reap = now
        freed = 0
        for process in Process.all(cells, header.rows):    # rows past were never used
            if process.pid and not self.alive(process.index, cells):
                freed += process.held
                # Keep its counters, so instance totals never go backwards.
                reaped = header.reaped(process.role)
                for i, value in enumerate(process.counters()):
                    cells[reaped + i] += value
                process.clear()
                _clear_offers(cells, process.index)
        for slot, state in enumerate(Waiter.column(cells, 'state')):
            if state != FREE:
                waiter = Waiter(cells, slot)
                if Process(cells, waiter.proc).pid != waiter.pid:
                    waiter.clear()
        header.waiting = sum(1 for state in Waiter.column(cells, 'state') if state == WAITING)
        return freed + self._reap_lots_shared_locked(cells)

    def _reap_lots_shared_locked(self, cells):
        """Free the parking lots of families no live process belongs to (an instance
        restarted: its queues, and the connections in them, are gone). Slots freed."""
        families = None
        freed = 0
        header = self.header
        for lot in Lot.all(cells):
            if not lot.owner:
                continue
            if families is None:
                families = set(Process.column(cells, 'family'))
            if lot.owner not in families:
                lost = max(lot.count, 0)
                header.parked = max(header.parked - lost, 0)
                freed += lost
                lot.clear()
        return freed

    # ------------------------------------------------------------------ history
    def record_history(self, period_ms=5000):
        """Append one sample of the instance totals if the last is older than the period."""
        now = int(time.time() * 1000)
        header = self.header
        if now - header.hist_last < period_ms:
            return False
        with self.locked() as cells:
            if now - header.hist_last < period_ms:
                return False
            header.hist_last = now
            pos = header.hist_pos % N_HIST
            sample = Sample(cells, pos)
            sample.time = now
            sample.held = self.total_held()
            sample.in_use = sum(Process.column(cells, 'in_use'))
            sample.idle = self.idle_total()
            sample.waiting = header.waiting
            sample.long_lived = sum(Process.column(cells, 'long_lived'))
            header.hist_pos = pos + 1
        return True

    def history(self):
        """Samples oldest first: [(time_ms, held, in_use, idle, waiting, long_lived)]."""
        return sorted(sample.values() for sample in Sample.all(self.cells) if sample.time)

    # ------------------------------------------------------------------ per-process details
    # Written lock-free by the process itself (maintenance tick), read by the
    # dashboard of whichever worker answers. The pid cell makes a row left by a
    # dead process invisible to its successor; since = 0 means "nothing borrowed".
    def publish_longest_borrow(self, row, pid, since_ms=0, database='', site=''):
        """Publish the longest current borrow of process ``row`` (since_ms = 0: none)."""
        detail = Detail(self.cells, row)
        detail.since = 0                    # readers skip the row while the text changes
        offset = detail.text_offset()
        self.map[offset:offset + D_DATABASE_BYTES] = _fixed(database, D_DATABASE_BYTES)
        self.map[offset + D_DATABASE_BYTES:offset + D_DATABASE_BYTES + D_SITE_BYTES] = \
            _fixed(site, D_SITE_BYTES, keep_end=True)
        detail.pid = pid
        detail.since = since_ms

    def longest_borrow(self, row, pid):
        """{'since_ms', 'database', 'site'} published by process ``pid`` in ``row``, or None."""
        detail = Detail(self.cells, row)
        for _attempt in range(3):
            since = detail.since
            if not since or detail.pid != pid:
                return None
            offset = detail.text_offset()
            raw = bytes(self.map[offset:offset + D_DATABASE_BYTES + D_SITE_BYTES])
            if detail.since == since:
                return {'since_ms': since, 'database': _text(raw[:D_DATABASE_BYTES]),
                        'site': _text(raw[D_DATABASE_BYTES:])}
        return None

    def doorbell(self):
        """The :class:`~.doorbell.Doorbell` of this shared state, or None where it cannot
        be used (the maintenance threads then poll)."""
        if self._doorbell is False:
            from .doorbell import for_state
            self._doorbell = for_state(self, H_BELL)
        return self._doorbell

    def close(self):
        _states.discard(self)
        rows, self._rows = self._rows, None
        if rows is not None and rows.pid == os.getpid():
            rows.users -= 1
            if rows.users <= 0:     # the last object of this file here: the row dies
                rows.drop()
                _rows.pop(self._inode, None)
        if self._doorbell:
            self._doorbell.close()  # its reference into the mapping would keep it open
        self._doorbell = None
        try:
            self.cells.release()
            self.map.close()
        finally:
            os.close(self.fd)
