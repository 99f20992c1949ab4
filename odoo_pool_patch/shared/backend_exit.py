"""When a closed connection's backend has exited, and whether an idle one's server
said goodbye (no round trip).

The server closes its end of the socket only after the backend has left
``pg_stat_activity``, so EOF on a descriptor of that socket means "gone from
the server": a budget slot freed then is reused without the server ever
seeing one connection too many. The pool watches duplicates of the sockets it
closes (:func:`begin_close`); the parking watches the parked sockets it
received and said goodbye on.
"""
import logging
import os
import select
import time

import psycopg2

_logger = logging.getLogger('odoo.sql_db.pool')

_POLLIN = select.POLLIN
_DONE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


def readable(fds, timeout=0.0):
    """The fds among ``fds`` with something to read (data, EOF, an error or not a
    descriptor any more) within ``timeout`` seconds (None: no limit). poll(), not
    select(): select() cannot watch descriptors from 1024 up, which a threaded Odoo
    with many websockets reaches. ``select.poll`` is looked up at each call, so that
    gevent's cooperative one is used once it has patched the module."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, _POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    try:
        events = poller.poll(ms)
    except InterruptedError:    # (PEP 475 retries; kept for gevent's implementation)
        events = ()
    return [fd for fd, event in events if event & _DONE]


def exited(fds, timeout=0.0):
    """The fds whose backend exited within ``timeout``; they are closed. Without a
    timeout this never blocks."""
    done = []
    try:
        ready = readable(fds, timeout) if fds else ()
    except (OSError, ValueError):
        ready = ()          # none for now: each is given up at its deadline (see finished)
    for fd in ready:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue        # nothing to read after all: the backend is still there
        except OSError:
            data = b''      # reset by the server, or not a descriptor any more: gone
        if not data:
            try:
                os.close(fd)
            except OSError:
                pass
            done.append(fd)
    return done


def finished(exiting, timeout=0.0):
    """Take out of ``exiting`` (entries [fd, give-up deadline, shed]) those whose backend
    exited, or whose deadline passed (slow or unreachable server: their fd is closed);
    returns (how many, how many of them shed)."""
    done = set(exited([entry[0] for entry in exiting], timeout))
    now = time.monotonic()
    freed = shed = 0
    for entry in list(exiting):
        if entry[0] in done or entry[1] <= now:
            if entry[0] not in done:
                os.close(entry[0])      # gave up waiting
            exiting.remove(entry)
            freed += 1
            shed += entry[2]
    return freed, shed


def wait_exited(fds, timeout):
    """Wait up to ``timeout`` seconds for the backends behind ``fds`` to exit; every fd
    is closed on return."""
    fds = list(fds)
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done = exited(fds, remaining)
            for fd in done:
                fds.remove(fd)
            if not done and deadline - time.monotonic() > 0.05:
                time.sleep(0.01)    # (a poll that failed returns at once: do not spin)
    finally:
        for fd in fds:
            os.close(fd)


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
