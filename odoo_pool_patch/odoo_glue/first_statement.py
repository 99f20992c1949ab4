"""Re-run the first statement of a borrow whose connection turned out dead.

A connection can die between the moment the pool hands it out and the first
statement (a backend terminated, a server restarted): the pool checks it when
it lends it, but the kill can come a microsecond later. Then nothing of the
request's transaction has reached the server, so Odoo's cursor is moved to a
new connection and that statement is sent again, once. Never anything else:

- only the first statement through Odoo's ``Cursor.execute`` after a borrow
  (``cnx.pooled.asked``, set by the pool's ``borrow``, cleared here once it ran);
- only when no transaction was open before it (``status`` READY: nothing
  uncommitted can be lost), the session is clean (``cnx.pooled.dirty``: no SET that
  the new connection would lack), and not in autocommit (a statement the dead
  server may have committed is never sent twice);
- only when the ``BEGIN`` psycopg2 sends before it, in a round trip of its
  own, is what failed on a connection the server closed (``closed == 2`` and
  ``status`` still READY): the statement never left. A statement killed while
  it ran (``status`` BEGIN) may have done anything, COMMIT included, and fails
  as in stock Odoo; so does a connection the pool closed (``close_db``).

Installed on ``odoo.sql_db.Cursor`` by :mod:`.odoo_install`; the cost on every
later statement is one attribute read.

The same install lets Odoo close a cursor whose session the server ended in
the middle of a transaction (a backend terminated, a server restart): the
rollback of ``Cursor._close`` fails there in stock Odoo, which answers 500 for
a request that had committed (Odoo 18/19 close the read/write cursor of the
signaling check after the request's work) and never gives the connection back
to the pool. Only in ``_close``, only for a connection of the pool that ended
inside a transaction (``closed == 2``, ``status`` BEGIN: a failed COMMIT leaves
READY, and may have committed), the failed rollback counts as done: the
transaction can no longer commit, whatever the server does with it. Every other
rollback raises as in stock Odoo.
"""
import logging

import psycopg2
from psycopg2.extensions import STATUS_BEGIN, STATUS_READY

from ..sessions.conn_record import record_of

_logger = logging.getLogger('odoo.sql_db')


def install(cursor_class):
    """Wrap ``cursor_class.execute`` (Odoo's ``Cursor``). Idempotent."""
    stock = cursor_class.execute
    if getattr(stock, 'db_pooling_stock', None) is not None:
        return

    def execute(self, query, params=None, log_exceptions=True):
        record = getattr(self._cnx, 'pooled', None)
        if record is None or record.asked is None:
            return stock(self, query, params, log_exceptions)
        return _first(self, stock, query, params, log_exceptions)

    execute.__doc__, execute.__name__ = stock.__doc__, stock.__name__
    execute.__qualname__ = stock.__qualname__
    execute.db_pooling_stock = stock
    cursor_class.execute = execute
    _install_rollback(cursor_class)


def _install_rollback(cursor_class):
    stock_rollback, stock_close = cursor_class.rollback, cursor_class._close
    if getattr(stock_rollback, 'db_pooling_stock', None) is not None:
        return

    def _close(self, *args, **kwargs):
        self._dbp_closing = True
        try:
            return stock_close(self, *args, **kwargs)
        finally:
            self._dbp_closing = False

    def rollback(self):
        try:
            return stock_rollback(self)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            cnx = vars(self).get('_cnx')
            if not vars(self).get('_dbp_closing') or cnx is None or cnx.closed != 2 or \
                    cnx.status != STATUS_BEGIN or not _tracked(cnx):
                raise
            _logger.info('db_pooling: closing a cursor on database %r whose session the '
                         'server ended inside a transaction (%s): nothing to roll back',
                         self.dbname, first_line(exc))
        self._now = None                # what stock rollback does after the connection's
        self.postrollback.run()
        return None

    for wrapper, stock in ((_close, stock_close), (rollback, stock_rollback)):
        wrapper.__doc__, wrapper.__name__ = stock.__doc__, stock.__name__
        wrapper.__qualname__ = stock.__qualname__
        wrapper.db_pooling_stock = stock
    cursor_class._close, cursor_class.rollback = _close, rollback


def _first(cr, stock, query, params, log_exceptions):
    cnx = cr._cnx
    record = cnx.pooled
    asked, record.asked = record.asked, None
    retry = cnx.status == STATUS_READY and not record.dirty and not cnx.autocommit and \
        not cnx.closed
    if not retry:
        return stock(cr, query, params, log_exceptions)
    try:
        return stock(cr, query, params, False)
    except psycopg2.OperationalError as exc:
        # BEGIN failed (status still READY) because the server closed the connection
        # (closed == 2, not our close_all's 1): the statement never reached the server.
        if cnx.closed != 2 or cnx.status != STATUS_READY or cr._cnx is not cnx or cr._closed:
            _log(cr, query, exc, log_exceptions)
            raise
        _replace(cr, cnx, asked, exc)
    except Exception as exc:
        _log(cr, query, exc, log_exceptions)
        raise
    return stock(cr, query, params, log_exceptions)


def _log(cr, query, exc, log_exceptions):
    # What Odoo's execute logs itself (we asked it not to, to stay silent on a retry).
    if log_exceptions:
        _logger.error("bad query: %s\nERROR: %s", getattr(cr._obj, 'query', None) or query, exc)


def _replace(cr, dead, asked, exc):
    """Move Odoo's cursor ``cr`` from the ``dead`` connection to a new one."""
    move_cursor(cr, dead, asked)
    stats = pool_stats(cr._cnx)
    if stats is not None:
        stats.first_statement_retries += 1
    _logger.info('db_pooling: the connection lent for database %r was closed by the server '
                 'before its first statement reached it (%s); sent that statement on a new '
                 'connection', cr.dbname, first_line(exc))
    cr._cnx.pooled.asked = None


def move_cursor(cr, dead, connection_info):
    """Give Odoo's cursor ``cr`` a new connection for ``connection_info`` with the
    session characteristics of ``dead`` (read-only on Odoo 18+, isolation level),
    which goes back to the pool closed. Raises what the borrow raises: ``cr`` then
    keeps the closed connection (closing it later is a no-op for the pool)."""
    pool = cr._Cursor__pool
    characteristics = dict(isolation_level=dead.isolation_level, readonly=dead.readonly,
                           deferrable=dead.deferrable)
    try:
        cr._obj.close()
    except psycopg2.Error:
        pass
    pool.give_back(dead, keep_in_pool=False)
    cnx = pool.borrow(connection_info)
    try:
        cnx.set_session(**characteristics)
        obj = cnx.cursor()
    except BaseException:       # (gevent.Timeout, Odoo's SIGXCPU: the slot back)
        pool.give_back(cnx, keep_in_pool=False)
        raise
    cr._cnx, cr._obj = cnx, obj


def _tracked(cnx):
    record = record_of(cnx)
    return record is not None and record.tracked


def pool_stats(cnx):
    """The counters of the pool ``cnx`` belongs to; None if it is not a pool's."""
    record = record_of(cnx)
    return None if record is None or record.pool is None else record.pool.stats


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
