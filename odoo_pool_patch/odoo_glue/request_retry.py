"""Run a request again when the server closed its connection under it (a backend
terminated, a server restart) and nothing of it can have been committed.

Odoo already runs a request again when PostgreSQL reports a serialization
failure or a deadlock: ``odoo.service.model.retrying`` rolls its transaction
back, resets the environment, reloads the session, rewinds the uploaded files
and calls the controller again. A connection that dies in the middle of a
request leaves the database as a serialization failure does (the server rolled
the transaction back), but stock Odoo fails the request: its rollback raises
``InterfaceError: connection already closed``. With a pool of few connections,
nearly all in use, nearly every terminated backend is one in use.

:func:`install` wraps ``retrying`` (Odoo 16-19 look it up at each call: the
HTTP request, the websocket message, ``execute_kw``) so that such a request
runs again, on a new connection, at most :data:`MAX_RETRIES` times, when all
of these hold once the attempt failed:

- the cursor of the attempt is open and its connection is one of the pool's
  that the *server* ended: psycopg2's ``closed == 2`` (``close_db`` of ours
  leaves 1) with, in the error or the one it was raised from, SQLSTATE 57P01
  (terminated: ``pg_terminate_backend``, a shutdown), 57P02 (another backend
  crashed), 57P03 (starting), or libpq's words for a socket the server closed
  (:data:`CLOSED_BY_SERVER`, what a terminated backend nearly always looks
  like, plain or over TLS) when the attempt did not last as long as an
  idle-in-transaction or transaction timeout in force (which end a session the
  same way). Not a keepalive timeout or a TLS error, after which the backend
  may still run;
- nothing may have been committed in this thread (or greenlet) while the
  attempt ran, on any connection: no ``commit()`` sent on a live connection (a
  COMMIT whose answer was lost may have been applied), no connection put in
  autocommit, no ``COMMIT`` / ``END`` / ``PREPARE TRANSACTION`` sent as SQL
  (:mod:`.session_tracking` calls :func:`committed` for each), nothing run
  through ``dblink`` or ``pg_background``, nothing whose text we cannot read
  (``DO``, ``CALL``: session_state's UNKNOWN), no cursor of another class;
- the failure is not the pool's own (:class:`~.errors.PoolError`: no
  connection came in time);
- the request's uploaded files can be rewound (as Odoo's own retry requires).

What runs outside the thread's connections is not seen: another thread, another
process, a connection opened with ``psycopg2.connect`` by a module. Odoo's own retry
of serialization failures has the same blind spot; ``db_pool_retry_terminated =
off`` turns this retry off for modules that commit that way.

The retry then does what Odoo's does for a serialization failure (new
connection, rollback hooks, environment, registry changes, session, files), so
it asks of controllers nothing Odoo does not ask already: to bear running
again when their transaction did not commit. Everything else fails as in
stock Odoo. The cost outside a failure: one thread-local read per request and
one call per commit.
"""
import functools
import logging
import re
import sys
import time

import psycopg2

from ..errors import PoolError
from ..sessions import commit_marks
from ..sessions.conn_record import record_of

_logger = logging.getLogger('odoo.sql_db')

MAX_RETRIES = 2


def install(model_module):
    """Wrap ``model_module.retrying`` (``odoo.service.model``). Idempotent."""
    stock = model_module.retrying
    if getattr(stock, 'db_pooling_stock', None) is not None:
        return

    def retrying(func, env):
        outer = sys.exc_info()[1]       # being handled by the caller: not ours
        for left in range(MAX_RETRIES, -1, -1):
            before, started = commit_marks.count(), time.monotonic()
            try:
                return stock(func, env)
            except Exception as exc:
                end = _may_retry(env, before, exc, outer)
                if not left or end is None:
                    raise
                prepared = False
                try:
                    _prepare(env, exc, end, MAX_RETRIES - left + 1,
                             time.monotonic() - started)
                    prepared = True
                except _MayHaveTimedOut as why:
                    _logger.info('db_pooling: the server closed the connection of a '
                                 'transaction on database %r while it ran; %s: not running '
                                 'it again', env.cr.dbname, why)
                except Exception:
                    _logger.warning('db_pooling could not run the request again on a new '
                                    'connection', exc_info=True)
                if not prepared:
                    raise       # the attempt's error, as it was
        raise AssertionError('unreachable')

    retrying.__doc__, retrying.__name__ = stock.__doc__, stock.__name__
    retrying.__qualname__ = stock.__qualname__
    retrying.db_pooling_stock = stock
    model_module.retrying = retrying


def install_reruns():
    """Run again what Odoo does outside ``retrying`` with cursors of its own, where a
    terminated backend would fail a request and drop the database from its session
    (HTTP 404, or a logout on 18+, until the user logs in again). Idempotent.

    - Loading a registry (a worker's first request to a database) without installing or
      updating modules: it commits on the way (the signaling sequences, the modules'
      state after a failure), but only what a load does again anyway, and stock Odoo
      loads it again at the next request: run again whatever it committed.
    - The registry signaling check when it opens its own cursor (16/17; 18 and 19 pass
      the request's, where a retry could lose what the caller did before on it).
    - The login of 16-18 (19 logs in on the request's cursor, inside ``retrying``).
    The rules are the others' (:func:`rerun`)."""
    from odoo import http
    from odoo.modules.registry import Registry
    new = Registry.__dict__['new'].__func__
    if getattr(new, 'db_pooling_stock', None) is None:
        Registry.new = classmethod(rerun(new, 'loading the registry of database',
                                         commits_matter=_updates_modules))
    check = Registry.check_signaling
    if getattr(check, 'db_pooling_stock', None) is None:
        Registry.check_signaling = rerun(
            check, 'checking the registry signaling of database',
            lambda args, kwargs: len(args) < 2 and kwargs.get('cr') is None)
    login = http.Session.authenticate
    if getattr(login, 'db_pooling_stock', None) is None:
        http.Session.authenticate = rerun(
            login, 'logging in to database',
            lambda args, kwargs: len(args) > 1 and isinstance(args[1], str))


def _updates_modules(args, kwargs):
    """Whether a ``Registry.new(cls, db_name, ...)`` call installs or updates modules
    (16-18: ``update_module``, 5th positional; 19: keywords)."""
    return bool(len(args) > 4 and args[4]) or any(
        kwargs.get(name) for name in ('update_module', 'install_modules', 'upgrade_modules',
                                      'reinit_modules'))


def rerun(func, what, applies=None, commits_matter=None):
    """``func`` run again, at most :data:`MAX_RETRIES` times, when it failed because the
    server ended a session (:func:`ended_by_server`; for a socket closed without a word,
    only if it did not last as long as a timeout in force could have) and nothing may
    have been committed in this thread meanwhile (``commits_matter(args, kwargs)``
    false: whatever it committed). For functions that open their own cursors
    (``applies(args, kwargs)`` false: it was given one, so it is not run again)."""
    def wrapper(*args, **kwargs):
        outer = sys.exc_info()[1]       # being handled by the caller: not ours
        for left in range(MAX_RETRIES, -1, -1):
            before, started = commit_marks.count(), time.monotonic()
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                end = None if isinstance(exc, PoolError) else _session_end(exc, outer)
                if not left or end is None or \
                        (applies is not None and not applies(args, kwargs)) or \
                        (commit_marks.count() != before and
                         (commits_matter is None or commits_matter(args, kwargs))):
                    raise
                database = next((arg for arg in args if isinstance(arg, str)), None) or \
                    getattr(args[0] if args else None, 'db_name', None)
                if end == 'eof' and not _shorter_than_timeouts(
                        database, time.monotonic() - started):
                    raise
                from .first_statement import first_line
                _logger.info('db_pooling: the server ended a session while %s %r (%s); '
                             'doing it again (retry %d of %d)', what, database,
                             first_line(exc), MAX_RETRIES - left + 1, MAX_RETRIES)
        raise AssertionError('unreachable')

    functools.update_wrapper(wrapper, func)
    wrapper.db_pooling_stock = func
    return wrapper


def _shorter_than_timeouts(database, elapsed):
    """Whether ``elapsed`` seconds are shorter than the timeouts in force on
    ``database`` (read on a connection of the pool; False if that fails)."""
    if not database:
        return False
    from odoo import sql_db
    try:
        cr = sql_db.db_connect(database).cursor()
        try:
            limit = _timeout_limit(cr)
            cr._cnx.rollback()
        finally:
            cr.close()
    except Exception:       # noqa: BLE001 - the original error is what matters
        return False
    return not limit or elapsed < limit


# Why the server ends a session: terminated (pg_terminate_backend, a fast or smart
# shutdown), after another backend crashed, or while starting. Not an idle-in-transaction
# or transaction timeout (25P03, 25P04): a request that keeps its transaction open that
# long (waiting on a remote service?) would only do it again.
SERVER_ENDED = frozenset(('57P01', '57P02', '57P03'))
# libpq's words for a socket the server closed without a word (a backend killed, a
# server crash), in plain text and over TLS (where even a backend terminated while it
# ran says nothing more); not a keepalive timeout or a TLS error, after which the
# backend may live on.
CLOSED_BY_SERVER = ('server closed the connection unexpectedly',
                    'SSL connection has been closed unexpectedly',
                    'SSL SYSCALL error: EOF detected')


def _may_retry(env, before, exc, outer):
    """How the server ended the session of ``env.cr`` ('code' or 'eof', see
    :func:`_session_end`) if the request may run again; None if not."""
    if isinstance(exc, PoolError) or commit_marks.count() != before:
        return None
    cr = env.cr
    cnx = vars(cr).get('_cnx')      # (not through Odoo's TestCursor, which forwards it)
    record = record_of(cnx)
    if cnx is None or cr._closed or cnx.closed != 2 or record is None or \
            record.info is None or not record.tracked:
        return None
    return _session_end(exc, outer)


def ended_by_server(exc):
    """Whether ``exc`` or what led to it (Odoo's rollback raises ``InterfaceError:
    connection already closed`` while handling the real error) says the server ended
    the session."""
    return _session_end(exc) is not None


def _session_end(exc, outer=None):
    """'code': the server said it ended the session (SERVER_ENDED); 'eof': the socket
    closed without a word, which is also what a session ended for an idle-in-transaction
    timeout looks like when the client sends its next statement; None: neither. The
    walk stops at ``outer``, an exception the caller was handling before."""
    seen = 0
    while exc is not None and exc is not outer and seen < 8:
        if isinstance(exc, psycopg2.OperationalError):
            code = exc.pgcode
            if code in SERVER_ENDED:
                return 'code'
            if code is None:
                text = str(exc)
                if any(words in text for words in CLOSED_BY_SERVER):
                    return 'eof'
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class _MayHaveTimedOut(Exception):
    """The session may have been ended by a timeout the retry would meet again."""


_DURATION = re.compile(r'(\d+)\s*(ms|s|min|h|d)?')
_UNITS = {None: 0.001, 'ms': 0.001, 's': 1.0, 'min': 60.0, 'h': 3600.0, 'd': 86400.0}


def _timeout_limit(cr):
    """The shortest of ``idle_in_transaction_session_timeout`` and (PostgreSQL 17+)
    ``transaction_timeout`` in force for a transaction of ``cr``'s new connection (the
    server's, the role's, the database's and db_pooling's own ``SET LOCAL`` of them,
    which the tracking cursor puts in front of this first statement), in seconds; 0: none."""
    cr._obj.execute("SELECT current_setting('idle_in_transaction_session_timeout'), "
                    "current_setting('transaction_timeout', true)")
    limits = []
    for value in cr._obj.fetchone():
        match = _DURATION.fullmatch((value or '').strip())
        if match and int(match.group(1)):
            limits.append(int(match.group(1)) * _UNITS[match.group(2)])
    return min(limits, default=0.0)


def _prepare(env, exc, end, attempt, elapsed):
    """Put the request back as it was before its failed attempt (which lasted
    ``elapsed`` seconds; ``end`` as :func:`_may_retry` says), on a new connection."""
    from odoo.http import request

    from .first_statement import first_line, move_cursor, pool_stats
    if request:
        for name, upload in request.httprequest.files.items():
            if not (hasattr(upload, 'seekable') and upload.seekable()):
                raise RuntimeError(f'the uploaded file {name!r} cannot be read again')
    cr = env.cr
    dead = cr._cnx
    owner = dead.pooled.pool
    held = owner.borrowed_for(dead) if owner is not None else None
    elapsed = max(elapsed, held or 0.0)   # its transaction may have begun before the attempt
    move_cursor(cr, dead, dead.pooled.info)
    if end == 'eof':
        # A terminated backend, or a timeout that would end the next attempt as well
        # (a request that waits on a remote service with its transaction open).
        limit = _timeout_limit(cr)
        if limit and elapsed >= limit:
            cr._cnx.rollback()
            raise _MayHaveTimedOut(
                f'it lasted {elapsed:.1f} s, and a timeout of {limit:g} s '
                f'(idle_in_transaction_session_timeout or transaction_timeout) may have '
                f'ended it')
    cr.rollback()                       # on the new connection: Odoo's rollback hooks
    env.transaction.reset()
    env.registry.reset_changes()
    if request:
        request.session = request._get_session_and_dbname()[0]
        for upload in request.httprequest.files.values():
            upload.seek(0)
    stats = pool_stats(cr._cnx)
    if stats is not None:
        stats.request_retries += 1
    _logger.info('db_pooling: the server closed the connection of a transaction on database '
                 '%r while it ran (%s); nothing of it was committed: running it again on a '
                 'new connection (retry %d of %d)', cr.dbname, first_line(exc), attempt,
                 MAX_RETRIES)
