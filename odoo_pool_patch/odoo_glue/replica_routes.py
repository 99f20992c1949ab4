"""Replica routing inside Odoo: which cursors are read-only, and read-your-writes.

* Odoo 18/19 already open read-only cursors (``readonly`` routes,
  ``@api.readonly`` methods) from ``_Pool_readonly`` and retry on the primary
  when one writes (``ReadOnlySqlTransaction``). The router set on our pool
  class picks the replica per borrow; it never lets a replica failure reach
  ``Registry.cursor(readonly=True)``, so stock's 20-minute (19; 18: the
  process's life in early builds) "replica failed" switch never trips.
* Odoo 16/17 have no read-only cursors: :func:`replica_cursor` opens one for
  reports and custom code, and the JSON-RPC methods of
  ``db_replica_readonly_methods`` are served from one, retried on the primary
  when they write.
* Read-your-writes: a commit that wrote, in an HTTP request with a session,
  stores the primary's WAL position in the session; that session's
  read-only cursors then only go to a replica that has replayed it.

Odoo is imported inside the functions only.
"""
import json
import logging
import sys
import threading

import psycopg2
import psycopg2.errors

from ..replicas.router import WRITTEN_LSN_SQL, targets_from_config
from .runtime import RUNTIME

_logger = logging.getLogger('odoo.sql_db.replicas')

SESSION_KEY = 'db_pooling_lsn'


def current_session():
    """The HTTP session of this thread's request, or None (cron, shell, no request)."""
    try:
        from odoo.http import request
        return request.session if request else None
    except (RuntimeError, AttributeError, ImportError):
        return None


def session_lsn():
    session = current_session()
    return session.get(SESSION_KEY) if session is not None else None


def install(settings, pool_class, shared_state, base_info):
    """Set up routing for this process if replicas are configured (or Odoo 18/19's
    read-only pool would otherwise go to a stock default). Returns the router or None."""
    from odoo import release, sql_db
    from odoo.tools import config
    from ..replicas.replica_health import start_routing
    major = int(release.serie.split('.')[0].split('~')[-1].replace('saas', '') or 0)
    RUNTIME.major = major
    targets = targets_from_config(settings, config.get)
    stock_same_server = (major == 18 and config.get('db_replica_host') == '') or (
        major >= 19 and 'replica' in (config.get('dev_mode') or ()))
    if len(targets) == 1 and not stock_same_server:
        return None
    router = start_routing(shared_state(), targets, settings, base_info,
                           session_lsn if settings.replica_read_your_writes else None)
    pool_class.router = router
    RUNTIME.router = router
    if major >= 18 and len(targets) > 1 and not config.get('db_replica_host'):
        # Registries open their read-only pool only when db_replica_host is set;
        # its value does not matter (the router rewrites host and port per borrow).
        config['db_replica_host'] = targets[1].host or ''
        config['db_replica_port'] = targets[1].port
    if settings.replica_read_your_writes and len(targets) > 1:
        pool_class.connection_factory = ryw_connection_class(pool_class.connection_factory)
    patch_close_db(sql_db, router)
    if major < 18 and len(targets) > 1:
        patch_readonly_methods(settings.replica_readonly_methods, router)
    if major >= 18:
        patch_registry_retry(settings.replica_ban_time)
    _logger.info('db_pooling routes read-only cursors to %s (primary %s)',
                 ', '.join(f'{t.name} weight {t.weight}' for t in targets[1:]) or 'the primary',
                 targets[0].name)
    return router


def save_session(session):
    """Save the session now: Odoo saves it in post_dispatch, inside the request's
    transaction, so before the commit that gives us the position to store."""
    from odoo import http
    if getattr(session, 'can_save', True) and getattr(session, 'sid', None):
        try:
            http.root.session_store.save(session)
        except Exception:       # never fail a commit that succeeded
            _logger.warning('db_pooling could not save the session after a commit; its next '
                            'reads may go to a replica that has not replayed it', exc_info=True)


def ryw_connection_class(base):
    """``base`` whose commit records the WAL position of a commit that wrote in the session."""

    class ReadYourWritesConnection(base):
        def commit(self):
            session = None if self.readonly else current_session()
            if session is None:
                return super().commit()
            with self.cursor() as cur:
                cur.execute('SELECT txid_current_if_assigned() IS NOT NULL')
                wrote = cur.fetchone()[0]
                super().commit()
                if wrote:
                    cur.execute(WRITTEN_LSN_SQL)
                    lsn = cur.fetchone()[0]
                    super().rollback()      # end the transaction our SELECT opened
                    if lsn > (session.get(SESSION_KEY) or 0):
                        session[SESSION_KEY] = lsn
                        save_session(session)
    ReadYourWritesConnection.__name__ = base.__name__
    return ReadYourWritesConnection


def patch_close_db(sql_db, router):
    """Stock close_db passes the primary's DSN to the read-only pool, so its replica
    connections stay open (18/19): close those of every server too."""
    if getattr(sql_db.close_db, 'db_pooling', False):
        return
    original = sql_db.close_db

    def close_db(db_name):
        original(db_name)
        pool = getattr(sql_db, '_Pool_readonly', None)
        if pool is not None:
            info = sql_db.connection_info_for(db_name, readonly=True)[1]
            for target in router.targets:
                pool.close_all(router.rewrite(info, target))
    close_db.db_pooling = True
    sql_db.close_db = close_db


def patch_registry_retry(ban_time):
    """18/19 registries stop using their read-only pool for 20 minutes after one
    OperationalError from it. The router only lets one through when the primary itself
    is unreachable; once that is over, use replicas again after the ban time, not later."""
    import time
    from odoo.modules.registry import Registry
    if getattr(Registry.cursor, 'db_pooling', False):
        return
    original = Registry.cursor

    def cursor(self, /, readonly=False):
        failed = getattr(self, '_db_readonly_failed_time', None)
        if readonly and failed is not None and time.monotonic() > failed + ban_time:
            self._db_readonly_failed_time = None
        return original(self, readonly=readonly)
    cursor.db_pooling = True
    Registry.cursor = cursor


# ---------------------------------------------------------------------- Odoo 16/17
_readonly_pool = []


def replica_cursor(dbname):
    """A read-only cursor on a replica of ``dbname`` (or on the primary, read-only, when
    none is usable), on any series::

        from odoo_pool_patch.odoo_glue.replica_routes import replica_cursor
        with replica_cursor(env.cr.dbname) as cr:
            cr.execute('SELECT ...')

    Writing through it raises ``psycopg2.errors.ReadOnlySqlTransaction``."""
    from odoo import sql_db
    if RUNTIME.major >= 18:
        return sql_db.db_connect(dbname, readonly=True).cursor()
    if not _readonly_pool:
        from odoo.tools import config
        _readonly_pool.append(sql_db.ConnectionPool(int(config.get('db_maxconn') or 64),
                                                    readonly=True))
    cr = sql_db.Connection(_readonly_pool[0], dbname, sql_db.connection_info_for(dbname)[1]) \
        .cursor()
    cr._cnx.set_session(readonly=True)
    return cr


def _rpc_method(httprequest):
    """Model method of a JSON-RPC call_kw or execute_kw request, else None."""
    path = httprequest.path
    if not (path.startswith('/web/dataset/call_kw') or path == '/jsonrpc'):
        return None
    try:
        params = json.loads(httprequest.get_data(as_text=True)).get('params') or {}
    except (ValueError, AttributeError):
        return None
    if path == '/jsonrpc':
        args = params.get('args') or []
        return args[4] if params.get('method') == 'execute_kw' and len(args) > 4 else None
    return params.get('method')


def patch_readonly_methods(methods, router):
    """16/17: serve the JSON-RPC calls of ``methods`` with a replica cursor, retried on
    the primary if they write (as 18's readonly routes)."""
    from odoo import http
    from odoo.modules.registry import Registry
    methods = frozenset(methods)
    if getattr(Registry.cursor, 'db_pooling', False):
        return
    original_cursor = Registry.cursor

    def cursor(self, *args, **kwargs):
        if getattr(threading.current_thread(), 'cursor_mode', None) == 'ro' and \
                sys._getframe(1).f_code.co_name != 'check_signaling':
            return replica_cursor(self.db_name)
        return original_cursor(self, *args, **kwargs)
    cursor.db_pooling = True
    Registry.cursor = cursor

    def serve_readonly(original):
        def serve(self, *args, **kwargs):
            thread = threading.current_thread()
            if _rpc_method(self.httprequest) not in methods:
                return original(self, *args, **kwargs)
            thread.cursor_mode = 'ro'
            try:
                return original(self, *args, **kwargs)
            except psycopg2.errors.ReadOnlySqlTransaction:
                _logger.info('%s wrote on a read-only cursor: retried on the primary',
                             self.httprequest.path)
                thread.cursor_mode = 'ro->rw'
                router.note_write_fallback()
                return original(self, *args, **kwargs)
            finally:
                thread.cursor_mode = 'rw'
        serve.db_pooling = True
        return serve
    for name in ('_serve_db', '_serve_nodb'):
        setattr(http.Request, name, serve_readonly(getattr(http.Request, name)))
