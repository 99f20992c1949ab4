"""Wake the maintenance threads of every process of an instance at once.

A maintenance pass must run at once in every process when a borrower starts
waiting for the shared budget (idle connections are shed for it), but a pass,
or even a timed wake-up to ask, costs each worker CPU and the GIL (see
:mod:`.maintenance`). So the threads sleep on a *doorbell*: a 32-bit word of the
shared state used as a Linux futex, which works across processes on a shared
mapping. A borrower joining the budget's queue changes the word under the shared
lock (:meth:`Doorbell.bump`) and wakes every sleeper after it
(:meth:`Doorbell.wake`); a sleeper that read the word before checking whether
anyone waits cannot miss a ring (FUTEX_WAIT returns at once if the word changed
since).

Linux on x86-64 and arm64 only (:func:`for_state` returns None elsewhere), and
no sleeping on it under gevent, where a futex wait would block the whole process
(:func:`can_sleep`): the maintenance thread then wakes every ``SHED_TICK`` to ask
instead.
"""
import ctypes
import errno
import logging
import platform
import time

_logger = logging.getLogger('odoo.sql_db.pool')

_SYS_FUTEX = {'x86_64': 202, 'amd64': 202, 'aarch64': 98, 'arm64': 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1     # shared (not _PRIVATE): other processes sleep on it too
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]


def _syscall():
    if _SYS_FUTEX is None or platform.system() != 'Linux':
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syscall    # releases the GIL while it runs
    except (OSError, AttributeError):
        return None


_libc_syscall = _syscall()


def can_sleep():
    """Whether this process's maintenance may sleep on a doorbell: not under gevent,
    where it is a greenlet and a futex wait would block the whole process."""
    import sys
    monkey = sys.modules.get('gevent.monkey')
    return not (monkey and monkey.is_module_patched('threading'))


class Doorbell:
    """The doorbell of one shared state: the low-addressed half of cell ``cell``."""

    def __init__(self, state, cell):
        self._word = ctypes.c_uint32.from_buffer(state.map, cell * 8)
        self._address = ctypes.addressof(self._word)

    def value(self):
        return self._word.value

    def bump(self):
        """Change the word, under the shared state's lock (so that two rings never
        overwrite each other's change); then :meth:`wake`, after the lock."""
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF

    def wake(self):
        """Wake every process sleeping in :meth:`sleep` (never blocks)."""
        self._futex(_FUTEX_WAKE, _WAKE_ALL)

    def sleep(self, seen, timeout):
        """Sleep up to ``timeout`` seconds unless the word is no longer ``seen``
        (:meth:`value` read before checking that nothing is urgent), or until a ring."""
        if self._wait(seen, timeout) == -1 and \
                ctypes.get_errno() not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
            time.sleep(max(timeout, 0.0))       # never a busy loop

    def _wait(self, seen, timeout):
        timeout = max(timeout, 0.0)
        ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
        return self._futex(_FUTEX_WAIT, seen & 0xFFFFFFFF, ctypes.byref(ts))

    def _futex(self, op, value, timeout=None):
        """futex(2) on the word; -1 and errno on failure."""
        return _libc_syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(self._address),
                             ctypes.c_long(op), ctypes.c_long(value), timeout, None,
                             ctypes.c_long(0))

    def close(self):
        """Drop the reference into the mapping (the shared state can then be closed)."""
        self._word = None


def for_state(state, cell):
    """The doorbell of ``state``, or None where the futex cannot be used. Ringing is
    fine under gevent (it never blocks), sleeping is not: see :func:`can_sleep`."""
    if _libc_syscall is None:
        return None
    try:
        bell = Doorbell(state, cell)
        # The kernel answers at once: EAGAIN (the word differs from the one given), or
        # ETIMEDOUT if a ring made them equal meanwhile; anything else: no futex here.
        if bell._wait(bell.value() + 1, 0) != -1 or \
                ctypes.get_errno() not in (errno.EAGAIN, errno.ETIMEDOUT):
            raise OSError(ctypes.get_errno(), 'futex not usable')
        return bell
    except (OSError, TypeError, ValueError, AttributeError) as exc:
        _logger.debug('db_pooling: no doorbell (%s); maintenance threads poll', exc)
        return None
