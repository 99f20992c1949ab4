"""Put our pool in place of Odoo's: the addon's ``post_load`` calls :func:`post_load_hook`.

``odoo.sql_db.ConnectionPool`` is replaced for pools created later, and the
live ``_Pool`` / ``_Pool_readonly`` objects are converted *in place* (their
class is swapped and their connections adopted), so that every
``sql_db.Connection`` already holding a reference to them, a registry loaded
before us for instance, uses our pool too. Works on Odoo 16.0 to 19.0.

Odoo is imported inside the functions only: this module is importable (and
its helpers testable) without Odoo.
"""
import logging
import os

from .errors import ConfigError
from .options import load_settings
from .pool import ConnectionPool, Holder

_logger = logging.getLogger('odoo.sql_db.pool')

MODULE = 'db_pooling'
# Set once installed in this process: {'pid', 'settings', 'series'}.
STATE = {}


def server_wide_modules():
    """The server-wide modules of this Odoo process (16-18: odoo.conf; 19: config)."""
    import odoo
    from odoo.tools import config
    modules = getattr(getattr(odoo, 'conf', None), 'server_wide_modules', None)
    if modules is None:
        modules = config.get('server_wide_modules') or []
    if isinstance(modules, str):
        modules = modules.split(',')
    return [name.strip() for name in modules if name and name.strip()]


def is_active():
    """Whether our pool serves this process's cursors."""
    from odoo import sql_db
    return bool(STATE) and issubclass(sql_db.ConnectionPool, ConnectionPool)


def post_load_hook():
    """Entry point of the addon's ``post_load``.

    Odoo calls post_load for server-wide modules at start-up, and also, late,
    when a database that has the module installed is loaded. Only the first
    case may swap the pool: in the second we say clearly that pooling is off.
    """
    if MODULE not in server_wide_modules():
        _logger.warning(
            '%s is installed in a database but not loaded server-wide, so connection '
            'pooling is NOT active (stock Odoo pool in use). Enable it with '
            '--load=base,web,%s on the command line or server_wide_modules = base,web,%s '
            'in odoo.conf, then restart Odoo.', MODULE, MODULE, MODULE)
        return
    from odoo.tools import config
    try:
        settings = load_settings(config.get)
    except ConfigError as exc:
        _logger.critical('%s', exc)
        # SystemExit passes through Odoo's "except Exception" around post_load:
        # a server must not start with options it silently ignores.
        raise SystemExit(str(exc)) from None
    install(settings)


def install(settings):
    """Swap Odoo's pool class and convert its live pools. Idempotent."""
    from odoo import release, sql_db
    if issubclass(sql_db.ConnectionPool, ConnectionPool) and STATE.get('pid') == os.getpid():
        return sql_db.ConnectionPool
    pool_class = type('ConnectionPool', (ConnectionPool,), {
        '__module__': ConnectionPool.__module__,
        'settings': settings,
        'connection_factory': sql_db.PsycoConnection,
    })
    sql_db.ConnectionPool = pool_class
    for name in ('_Pool', '_Pool_readonly'):
        live = getattr(sql_db, name, None)
        if live is not None and not isinstance(live, ConnectionPool):
            adopt(live, pool_class)
    STATE.update(pid=os.getpid(), settings=settings, series=release.serie)
    _logger.info('db_pooling active in process %d (Odoo %s): %s', os.getpid(), release.serie,
                 ', '.join(f'{k}={v:g}' for k, v in settings.as_options().items()))
    return pool_class


def stock_connections(pool):
    """[(cnx, in_use)] of a stock Odoo pool, whatever its series' storage."""
    found = []
    for entry in list(pool._connections):
        if isinstance(entry, (tuple, list)):          # 16: (cnx, used); 17/18: [cnx, used, last]
            found.append((entry[0], bool(entry[1])))
        else:                                         # 19: cnx._pool_in_use
            found.append((entry, bool(getattr(entry, '_pool_in_use', False))))
    return found


def adopt(pool, pool_class):
    """Turn a live stock pool into ``pool_class`` in place, keeping its connections."""
    from .dsn import dsn_key
    connections = stock_connections(pool)
    maxconn, readonly = pool._maxconn, bool(getattr(pool, '_readonly', False))
    for attr in list(vars(pool)):
        delattr(pool, attr)
    pool.__class__ = pool_class
    ConnectionPool.__init__(pool, maxconn, readonly)
    for cnx, in_use in connections:
        if cnx.closed:
            continue
        pool.prepare_connection(cnx, dsn_key(cnx.dsn))
        if in_use:
            pool._used[cnx] = Holder(None)
        else:
            pool._push_idle_locked(cnx)
    _logger.info('db_pooling took over %r', pool)
