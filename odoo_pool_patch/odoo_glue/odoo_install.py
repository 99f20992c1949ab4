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

from ..config.options import load_settings
from ..errors import ConfigError
from ..pool.connection_pool import ConnectionPool
from ..pool.sharing import deferred_parking
from ..sessions.session_tracking import tracked_class
from . import first_statement, list_dbs_cache, request_retry
from .runtime import RUNTIME

_logger = logging.getLogger('odoo.sql_db.pool')

MODULE = 'db_pooling'


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
    return RUNTIME.installed and issubclass(sql_db.ConnectionPool, ConnectionPool)


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
            'in odoo.conf (Odoo 19: base,rpc,web,%s), then restart Odoo.',
            MODULE, MODULE, MODULE, MODULE)
        return
    from odoo.tools import config
    from ..config import conf_file, tls
    try:
        source = conf_file.from_odoo(config)
        problems = source.problems
        if not problems:
            settings = load_settings(source.get, source=source.where)
            problems = tls.validate(source.get, where=source.where)
        if problems:
            raise ConfigError('db_pooling cannot start: ' + ' '.join(problems))
    except ConfigError as exc:
        _logger.critical('%s', exc)
        # SystemExit passes through Odoo's "except Exception" around post_load:
        # a server must not start with options it silently ignores.
        raise SystemExit(str(exc)) from None
    if process_role() != 'gevent':      # said once, by the master (or threaded server)
        for note in source.notes():
            _logger.warning('%s', note)
    install(settings, source.get)


def install(settings, get=None):
    """Swap Odoo's pool class and convert its live pools. Idempotent. ``get`` reads the
    TLS options (default: Odoo's config; see conf_file)."""
    from odoo import release, sql_db
    if issubclass(sql_db.ConnectionPool, ConnectionPool) and RUNTIME.pid == os.getpid():
        return sql_db.ConnectionPool
    pool_class = type('ConnectionPool', (ConnectionPool,), {
        '__module__': ConnectionPool.__module__,
        'settings': settings,
        # Odoo's connection class, noting the session state its cursors leave.
        'connection_factory': tracked_class(sql_db.PsycoConnection),
    })
    set_role(process_role())
    _patch_worker_roles()
    if settings.shared:
        pool_class.budget = attach_budget(settings)
    install_tls(get)
    os.environ.update(job_runner_environ(settings, os.environ, _queue_job_config()))
    install_replicas(settings, pool_class)
    list_dbs_cache.install(settings.list_dbs_cache,
                           pool_class.budget.state if pool_class.budget else None)
    sql_db.ConnectionPool = pool_class
    first_statement.install(sql_db.Cursor)
    if pool_class.budget is not None:
        _defer_parking_in_requests()
    if settings.retry_terminated:
        from odoo.service import model as service_model
        request_retry.install(service_model)
        request_retry.install_reruns()
    for name in ('_Pool', '_Pool_readonly'):
        live = getattr(sql_db, name, None)
        if live is not None and not isinstance(live, ConnectionPool):
            adopt(live, pool_class)
    RUNTIME.settings, RUNTIME.series, RUNTIME.budget = settings, release.serie, pool_class.budget
    RUNTIME.pid = os.getpid()          # last: installed
    _logger.info('db_pooling active in process %d (Odoo %s): %s', os.getpid(), release.serie,
                 settings.describe())
    if process_role() in ('master', 'threaded'):
        log_budget(settings, pool_class.budget)
    return pool_class


def install_tls(get=None):
    """Add odoo.conf's TLS settings to every connection and to pg_dump/psql's environment."""
    from odoo import sql_db
    from odoo.tools import config, misc
    from ..config import tls
    if getattr(sql_db.connection_info_for, 'db_pooling', False):
        return
    get = get or config.get
    original_info = sql_db.connection_info_for

    def connection_info_for(db_or_uri, *args, **kwargs):
        db, info = original_info(db_or_uri, *args, **kwargs)
        info['application_name'] = app_name(info.get('application_name'))
        readonly = kwargs.get('readonly', args[0] if args else False)
        for keyword, value in tls.tls_keywords(get, replica=bool(readonly)).items():
            info.setdefault(keyword, value)
        if readonly and tls.conf_value(get, 'db_replica_sslmode'):
            info['sslmode'] = tls.sslmode(get, replica=True)
        return db, info
    connection_info_for.db_pooling = True
    sql_db.connection_info_for = connection_info_for

    original_environ = misc.exec_pg_environ

    def exec_pg_environ(*args, **kwargs):
        return tls.pg_environ(get, original_environ(*args, **kwargs))
    misc.exec_pg_environ = exec_pg_environ
    import odoo.service.db as service_db
    import odoo.tools
    # Both import it by name from misc.
    for module in (service_db, odoo.tools):
        if hasattr(module, 'exec_pg_environ'):
            module.exec_pg_environ = exec_pg_environ


def _queue_job_config():
    from odoo.tools import config
    misc = getattr(config, 'misc', None) or {}
    return misc.get('queue_job') or {}


def job_runner_environ(settings, environ, queue_job_config):
    """Environment that sends queue_job's job runner (its LISTEN queue_job and its
    session advisory lock) to db_direct_host/port, unless its own
    ``jobrunner_db_host``/``_port`` (odoo.conf [queue_job] or environment) say otherwise."""
    if not settings.direct_host:
        return {}
    wanted = {'HOST': settings.direct_host}
    if settings.direct_port:
        wanted['PORT'] = str(settings.direct_port)
    if environ.get('ODOO_QUEUE_JOB_JOBRUNNER_DB_HOST') or queue_job_config.get('jobrunner_db_host'):
        return {}
    return {f'ODOO_QUEUE_JOB_JOBRUNNER_DB_{name}': value for name, value in wanted.items()
            if not environ.get(f'ODOO_QUEUE_JOB_JOBRUNNER_DB_{name}')
            and not queue_job_config.get(f'jobrunner_db_{name.lower()}')}


def install_replicas(settings, pool_class):
    """Replica routing (see replica_routes) when replicas are configured."""
    from odoo import sql_db
    from . import replica_routes
    from ..shared.shared_state import SharedState

    def state():        # without a shared budget, the same file still holds the server rows
        if pool_class.budget is not None:
            return pool_class.budget.state
        return SharedState(budget_settings(settings)[2])
    base_info = dict(sql_db.connection_info_for('postgres')[1])
    for keyword in ('database', 'application_name', 'host', 'port'):
        base_info.pop(keyword, None)
    return replica_routes.install(settings, pool_class, state, base_info)
# The role of this process for application_name: (pid, role); a forked child
# that was not told otherwise yet is an HTTP worker.
_ROLE = [None, 'other']


def current_role():
    return _ROLE[1] if _ROLE[0] == os.getpid() else 'http'


def set_role(role):
    _ROLE[:] = [os.getpid(), role]


def app_name(name):
    """Stock's ``odoo-<pid>`` becomes ``odoo-<role>-<pid>`` (odoo-http-1234,
    odoo-cron-1235, ...); a name the administrator chose (ODOO_PGAPPNAME, Odoo 19's
    db_app_name) is kept as it is."""
    pid = os.getpid()
    if name is None or name == f'odoo-{pid}':
        return f'odoo-{current_role()}-{pid}'
    return name


def process_role():
    import odoo
    from odoo.tools import config
    if getattr(odoo, 'evented', False):
        return 'gevent'
    return 'master' if int(config.get('workers') or 0) else 'threaded'


def default_budget(workers, cron_threads, maxconn):
    """db_pool_max_connections when not set: what the workers can use at once.

    An HTTP worker serves one request at a time (one cursor, sometimes two: the
    second waits briefly); a cron worker holds its LISTEN connection plus two
    per job; the gevent process one LISTEN connection plus its websockets'
    short cursors. Threaded servers keep stock's db_maxconn."""
    if workers:
        return workers + 3 * cron_threads + 1
    return maxconn


def process_count(workers, cron_threads):
    """Processes that each have a pool: master (or threaded server), workers, cron
    workers and, with workers, the gevent process."""
    return 1 + workers + cron_threads + (1 if workers else 0)


def budget_settings(settings):
    """(budget, cron reserve, shared path) with the computed defaults filled in."""
    from odoo.tools import config
    from ..shared.shared_state import default_path
    workers = int(config.get('workers') or 0)
    cron = int(config.get('max_cron_threads') or 0)
    size = settings.max_connections or default_budget(workers, cron, int(config.get('db_maxconn') or 64))
    reserve = settings.cron_reserve if settings.cron_reserve is not None else (1 if cron else 0)
    path = settings.shared_path or default_path(
        os.path.abspath(config.get('config') or config.rcfile or ''), config.get('db_host'),
        config.get('db_port'), config.get('db_user'), config.get('http_port'))
    return size, min(reserve, size - 1), path


def attach_budget(settings):
    from ..shared.budget import SharedBudget
    from ..shared.exchange import attach as attach_exchange
    from ..shared.shared_state import SharedState, SharedStateError
    size, reserve, path = budget_settings(settings)
    try:
        state = SharedState(path)
    except SharedStateError as exc:
        _logger.critical('%s', exc)
        raise SystemExit(str(exc)) from None
    except OSError as exc:
        message = (f'db_pooling cannot open its shared state file {path} ({exc.strerror}): set '
                   f'db_pool_shared_path to a writable absolute path, or db_pool_shared = off.')
        _logger.critical('%s', message)
        raise SystemExit(message) from None
    budget = SharedBudget(state, size, cron_reserve=reserve, min_idle=settings.min_idle,
                          role=process_role())
    # The gevent process holds LISTEN connections and short websocket cursors: nothing
    # worth offering, and a greenlet server would compete with the websockets.
    why_not = attach_exchange(budget, settings) if budget.role != 'gevent' else ''
    if why_not and settings.shared_idle:
        _logger.info('db_pooling: db_pool_shared_idle is on but %s: each process opens '
                     'its own connections', why_not)
    return budget


def _patch_worker_roles():
    """Tell application_name and the shared state which forked worker is HTTP and which cron."""
    from odoo import sql_db
    from odoo.service import server
    if getattr(server.Worker.run, 'db_pooling', False):
        return
    original = server.Worker.run

    def run(self, *args, **kwargs):
        role = 'cron' if isinstance(self, server.WorkerCron) else 'http'
        set_role(role)
        budget = getattr(sql_db.ConnectionPool, 'budget', None)
        if budget is not None:
            budget.set_role(role)
        return original(self, *args, **kwargs)
    run.db_pooling = True
    server.Worker.run = run


def _defer_parking_in_requests():
    """Serve each HTTP request under :func:`..pool.sharing.deferred_parking`: its cursors (the
    registry and route one, then the call's) share a connection instead of parking
    and unparking one between them."""
    from odoo import http
    for name in ('_serve_db', '_serve_nodb'):
        original = getattr(http.Request, name, None)
        # (its own mark: replica_routes wraps these first and marks its wrapper db_pooling)
        if original is None or getattr(original, 'db_pooling_deferred_parking', False):
            continue

        def serve(self, *args, _original=original, **kwargs):
            with deferred_parking():
                return _original(self, *args, **kwargs)
        serve.db_pooling = serve.db_pooling_deferred_parking = True
        serve.__name__ = serve.__qualname__ = name
        serve.__doc__ = original.__doc__
        setattr(http.Request, name, serve)


def server_limits(cnx):
    """(max_connections, superuser_reserved_connections) of the server behind ``cnx``."""
    with cnx.cursor() as cur:
        cur.execute("SELECT current_setting('max_connections')::int, "
                    "current_setting('superuser_reserved_connections')::int")
        return cur.fetchone()


def log_budget(settings, budget):
    """Print the budget next to what the server accepts; warn when it cannot fit."""
    import psycopg2
    from odoo import sql_db
    from odoo.tools import config
    workers = int(config.get('workers') or 0)
    cron = int(config.get('max_cron_threads') or 0)
    maxconn = int(config.get('db_maxconn') or 64)
    if budget is not None:
        wanted = budget.budget
        what = (f'one budget of {wanted} server connections for the whole instance '
                f'(db_pool_max_connections{"" if settings.max_connections else ", default"}; '
                f'workers={workers}, max_cron_threads={cron})')
    else:
        processes = process_count(workers, cron)
        wanted = processes * maxconn
        what = (f'no shared budget (db_pool_shared = off): worst case {wanted} connections = '
                f'{processes} processes x db_maxconn {maxconn}')
    info = sql_db.connection_info_for('postgres')[1]
    try:
        cnx = psycopg2.connect(**info)
        try:
            max_connections, reserved = server_limits(cnx)
        finally:
            cnx.close()
    except psycopg2.Error as exc:
        _logger.warning('db_pooling: %s; could not read max_connections from %s:%s (%s)', what,
                        info.get('host', 'local socket'), info.get('port', 5432),
                        str(exc).strip().splitlines()[0])
        return
    allowed = max_connections - reserved
    server = f"{info.get('host', 'local socket')}:{info.get('port', 5432)}"
    if wanted > allowed:
        _logger.warning('db_pooling: %s, but server %s accepts only %d (max_connections %d - '
                        'superuser_reserved_connections %d): lower db_pool_max_connections or '
                        'raise max_connections.', what, server, allowed, max_connections, reserved)
    else:
        _logger.info('db_pooling: %s; server %s accepts %d (max_connections %d - '
                     'superuser_reserved_connections %d).', what, server, allowed,
                     max_connections, reserved)


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
    from ..dsn import dsn_key
    connections = stock_connections(pool)
    maxconn, readonly = pool._maxconn, bool(getattr(pool, '_readonly', False))
    for attr in list(vars(pool)):
        delattr(pool, attr)
    pool.__class__ = pool_class
    ConnectionPool.__init__(pool, maxconn, readonly)
    for cnx, in_use in connections:
        if cnx.closed:
            continue
        pool.sessions.adopt(cnx, dsn_key(cnx.dsn), in_use)
    _logger.info('db_pooling took over %r', pool)
