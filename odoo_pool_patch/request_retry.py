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
  that the *server* closed (psycopg2's ``closed == 2``: the socket broke or the
  server ended the session; ``close_db`` of ours leaves 1);
- nothing may have been committed in this thread (or greenlet) while the
  attempt ran, on any connection: no ``commit()`` sent on a live connection (a
  COMMIT whose answer was lost may have been applied), no connection put in
  autocommit, no ``COMMIT`` / ``END`` / ``PREPARE TRANSACTION`` sent as SQL
  (:mod:`.session_tracking` calls :func:`committed` for each);
- the failure is not the pool's own (:class:`~.errors.PoolError`: no
  connection came in time);
- the request's uploaded files can be rewound (as Odoo's own retry requires).

The retry then does what Odoo's does for a serialization failure (new
connection, rollback hooks, environment, registry changes, session, files), so
it asks of controllers nothing Odoo does not ask already: to bear running
again when their transaction did not commit. Everything else fails as in
stock Odoo. The cost outside a failure: one thread-local read per request and
one call per commit.
"""
import logging
import threading

from .errors import PoolError

_logger = logging.getLogger('odoo.sql_db')

MAX_RETRIES = 2
_local = threading.local()      # Odoo's gevent worker patches it to greenlet-local


def committed():
    """Note that something may have been committed by this thread: the request
    it runs must not run again."""
    _local.commits = getattr(_local, 'commits', 0) + 1


def install(model_module):
    """Wrap ``model_module.retrying`` (``odoo.service.model``). Idempotent."""
    stock = model_module.retrying
    if getattr(stock, '_dbp_stock', None) is not None:
        return

    def retrying(func, env):
        for left in range(MAX_RETRIES, -1, -1):
            before = getattr(_local, 'commits', 0)
            try:
                return stock(func, env)
            except Exception as exc:
                if not left or not _may_retry(env, before, exc):
                    raise
                try:
                    _prepare(env, exc, MAX_RETRIES - left + 1)
                except Exception:
                    _logger.warning('db_pooling could not run the request again on a new '
                                    'connection', exc_info=True)
                    raise exc from None
        raise AssertionError('unreachable')

    retrying.__doc__, retrying.__name__ = stock.__doc__, stock.__name__
    retrying.__qualname__ = stock.__qualname__
    retrying._dbp_stock = stock
    model_module.retrying = retrying


def _may_retry(env, before, exc):
    if isinstance(exc, PoolError) or getattr(_local, 'commits', 0) != before:
        return False
    cr = env.cr
    cnx = getattr(cr, '_cnx', None)     # (none on Odoo's TestCursor)
    return cnx is not None and not cr._closed and cnx.closed == 2 and \
        getattr(cnx, '_dbp_info', None) is not None


def _prepare(env, exc, attempt):
    """Put the request back as it was before its failed attempt, on a new connection."""
    from odoo.http import request

    from .first_statement import first_line, move_cursor
    if request:
        for name, upload in request.httprequest.files.items():
            if not (hasattr(upload, 'seekable') and upload.seekable()):
                raise RuntimeError(f'the uploaded file {name!r} cannot be read again')
    cr = env.cr
    dead = cr._cnx
    move_cursor(cr, dead, dead._dbp_info)
    cr.rollback()                       # on the new connection: Odoo's rollback hooks
    env.transaction.reset()
    env.registry.reset_changes()
    if request:
        request.session = request._get_session_and_dbname()[0]
        for upload in request.httprequest.files.values():
            upload.seek(0)
    stats = getattr(getattr(cr._cnx, '_dbp_pool', None), 'stats', None)
    if stats is not None:
        stats.request_retries += 1
    _logger.info('db_pooling: the server closed the connection of a transaction on database '
                 '%r while it ran (%s); nothing of it was committed: running it again on a '
                 'new connection (retry %d of %d)', cr.dbname, first_line(exc), attempt,
                 MAX_RETRIES)
