"""The odoo.conf options db_pooling reads, their defaults and their validation.

The options live in the ``[db_pooling]`` section of odoo.conf (or, as before,
in ``[options]`` next to Odoo's own ``db_*`` options: see :mod:`.conf_file`).
Values come as raw strings, or as booleans where Odoo 16-18 turned
'True'/'False' into them, so everything here accepts strings, numbers and
booleans alike and turns them into one frozen :class:`Settings` object.

A bad value never silently falls back to a default: :func:`load_settings`
raises :class:`ConfigError` naming every bad option, its value and what is
allowed, and the addon stops the server with that message.
"""
import os
from dataclasses import dataclass, fields

from ..errors import ConfigError

_TRUE = {'1', 'true', 'yes', 'on'}
_FALSE = {'0', 'false', 'no', 'off'}


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError


def _count(value):
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    number = int(str(value).strip())
    if number < 0:
        raise ValueError
    return number


def _positive(value):
    number = _count(value)
    if number < 1:
        raise ValueError
    return number


def _path(value):
    text = str(value).strip()
    if not os.path.isabs(text):
        raise ValueError
    return text


def _token(value):
    text = str(value).strip()
    if len(text) < 16 or any(c.isspace() for c in text):
        raise ValueError
    return text


def _names(value):
    names = tuple(name.strip() for name in str(value).split(',') if name.strip())
    if any(not name.replace('_', '').isalnum() for name in names):
        raise ValueError
    return names


def parse_replicas(value):
    """``host:port[:weight], ...`` (IPv6 as ``[addr]:port``) -> ((host, port, weight), ...)."""
    entries = []
    for item in str(value).split(','):
        item = item.strip()
        if not item:
            continue
        if item.startswith('['):
            host, _, rest = item[1:].partition(']')
            parts = [host] + (rest[1:].split(':') if rest.startswith(':') else [])
        else:
            parts = item.split(':')
        if not parts[0] or len(parts) > 3:
            raise ValueError(item)
        port = int(parts[1]) if len(parts) > 1 else 5432
        weight = int(parts[2]) if len(parts) > 2 else 1
        if not 0 < port < 65536 or weight < 0:
            raise ValueError(item)
        entries.append((parts[0], port, weight))
    return tuple(entries)



def seconds(value):
    number = float(value)
    if number != number or number < 0 or number == float('inf'):
        raise ValueError
    return number


# Group of an option in odoo.conf.example and docs/configuration.rst, by name prefix (the longest matching
# prefix wins), so that a new option lands in its group without being listed here.
GROUP_PREFIXES = {
    'db_pool_': 'pool',
    'db_pool_shared': 'budget',
    'db_pool_max_connections': 'budget',
    'db_pool_cron_reserve': 'budget',
    'db_pool_min_idle': 'budget',
    'db_replica': 'replicas',
    'db_ssl': 'tls',
    'db_replica_ssl': 'tls',
    'db_direct_': 'pgbouncer',
    'db_pool_reset': 'pgbouncer',
    'db_pool_statement_timeout': 'pgbouncer',
    'db_pool_idle_in_transaction_timeout': 'pgbouncer',
    'db_pool_metrics': 'metrics',
    'db_pool_dashboard': 'metrics',
}


def group_of(name):
    prefixes = [prefix for prefix in GROUP_PREFIXES if name.startswith(prefix)]
    if not prefixes:
        raise ValueError(f'option {name} has no group: add its prefix to '
                         f'options.GROUP_PREFIXES')
    return GROUP_PREFIXES[max(prefixes, key=len)]


@dataclass(frozen=True)
class Option:
    name: str            # key in odoo.conf [db_pooling]
    field: str           # attribute of Settings
    parse: callable
    default: object
    allowed: str         # what the error message says is allowed
    doc: str             # meaning and when to change it (odoo.conf.example, docs/configuration.rst)
    shown_default: str = None   # how the docs show the default (else from the value)

    @property
    def group(self):
        return group_of(self.name)


OPTIONS = (
    Option('db_pool_wait_timeout', 'wait_timeout', seconds, 20.0,
           'a number of seconds >= 0',
           'How long a borrower waits for a free connection when the pool is at its limit '
           'before PoolError is raised, and for the database server to come back when it is '
           'restarting, shutting down, starting up or (once reached) refusing connections '
           '(one process probes it meanwhile). 0 restores stock behaviour (fail at once). '
           'Raise it if legitimate bursts time out or to ride out longer failovers; lower it '
           'to fail fast behind a load balancer.'),
    Option('db_pool_idle_timeout', 'idle_timeout', seconds, 60.0,
           'a number of seconds >= 0 (0 keeps idle connections forever)',
           'An idle connection unused for this long is closed by the maintenance timer. '
           'Stock Odoo keeps them 600 s. Lower it to give slots back to PostgreSQL sooner; '
           'raise it if connecting is expensive (TLS over a slow link).'),
    Option('db_pool_max_lifetime', 'max_lifetime', seconds, 3600.0,
           'a number of seconds >= 0 (0 means no limit)',
           'A connection older than this (minus up to 10% random jitter, so they do not all '
           'recycle at once) is closed when idle. Bounds server-side memory growth of long '
           'sessions and lets DNS or failover changes take effect.'),
    Option('db_pool_check_after', 'check_after', seconds, 30.0,
           'a number of seconds >= 0 (0: never)',
           'With db_pool_reset = smart, a clean connection idle for longer than this gets the '
           'full reset before it is handed out, which is also a liveness round trip: a dead one '
           'is replaced without the caller seeing an error. Every reuse is first checked for a '
           'closed socket (no round trip), and the maintenance timer closes dead idle '
           'connections, so a connection reused sooner goes out without any round trip. With '
           'db_pool_reset = always every reuse is checked by its reset. Lower it on links where '
           'firewalls or NAT silently drop idle connections.'),
    Option('db_pool_leak_warn_after', 'leak_warn_after', seconds, 300.0,
           'a number of seconds >= 0 (0 disables the warning)',
           'A connection borrowed for longer than this is logged once as a possible leak, '
           'with the line of code that borrowed it. Raise it if long reports or imports '
           'legitimately hold a cursor that long.'),
)

OPTIONS += (
    Option('db_pool_shared', 'shared', _bool, True,
           'on or off',
           'One connection budget for all processes of this Odoo instance (HTTP workers, cron '
           'workers, the gevent process), kept in shared memory. off: each process has only its '
           'own db_maxconn limit, as stock Odoo.'),
    Option('db_pool_max_connections', 'max_connections', _positive, None,
           'a whole number >= 1',
           'Most server connections the whole instance holds, idle ones included. Default: '
           'workers + 3 x max_cron_threads + 1 with workers (12 for 8 workers and 1 cron '
           'worker), db_maxconn without. Borrowers beyond it wait (db_pool_wait_timeout). Keep '
           'it under the server\'s max_connections minus superuser_reserved_connections, minus '
           'what other clients need; the start-up log prints both.'),
    Option('db_pool_cron_reserve', 'cron_reserve', _count, None,
           'a whole number >= 0',
           'Slots of the budget only cron may take when the rest is full, so a busy instance '
           'never starves scheduled jobs. Default 1 when max_cron_threads > 0, else 0.'),
    Option('db_pool_min_idle', 'min_idle', _count, 1,
           'a whole number >= 0',
           'Idle connections the whole instance keeps open past db_pool_idle_timeout, ready for '
           'the next request. 0 closes everything at rest.'),
    Option('db_pool_shared_idle', 'shared_idle', _bool, True,
           'on or off',
           'With db_pool_shared: a process that needs a connection to a database it holds none '
           'of takes an idle one from another process of the instance (its socket is passed '
           'over a Unix socket, its session and caches kept) instead of opening a new one: '
           'a fraction of a millisecond instead of a new backend, and no connection opened or '
           'closed. When the budget is full and every connection to that database is in use, '
           'it waits up to 50 ms for one to come back before opening one. When connections of '
           'a database keep moving, a process giving one back parks it in a kernel queue any '
           'worker takes it from with no process to ask. Only clean, non-TLS '
           'connections move. off: each process opens its own, '
           'closing one of its idle ones if the budget is full. Turn it off if a security '
           'module forbids passing file descriptors between processes.'),
    Option('db_pool_shared_path', 'shared_path', _path, None,
           'an absolute file path',
           'File holding the shared state (about 370 kB). Default: a file named after the '
           'config file and database server in /dev/shm/odoo-db_pooling-<uid> (a directory '
           'private to Odoo\'s user), so the processes of one instance find it. Set the same '
           'path on a volume shared by several Odoo containers of one host (same user id) to '
           'give them one budget. Its directory must belong to Odoo\'s user or root and not be '
           'writable by other users (unless sticky); the file is created at mode 0600 and '
           'refused if it is a symbolic link, belongs to another user or others may read it.'),
)

OPTIONS += (
    Option('db_pool_metrics_token', 'metrics_token', _token, None,
           'at least 16 characters without spaces',
           'Turns on /db_pooling/metrics (Prometheus text format, instance-wide figures from '
           'the shared state) for clients sending "Authorization: Bearer <token>", as '
           'Prometheus does with bearer_token / authorization credentials. Unset: the '
           'endpoint answers 404. Use a long random value (openssl rand -hex 24).',
           shown_default='(unset: endpoint off)'),
)


def _reset_mode(value):
    text = str(value).strip().lower()
    if text not in ('smart', 'always'):
        raise ValueError
    return text


def _host(value):
    text = str(value).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError
    return text


def _port(value):
    number = _positive(value)
    if number > 65535:
        raise ValueError
    return number


OPTIONS += (
    Option('db_pool_reset', 'reset', _reset_mode, 'smart',
           'smart or always',
           'How a reused connection is cleaned. smart: our cursors note the statements that '
           'change session state (SET, LISTEN, session advisory locks, temp tables, WITH HOLD '
           'cursors, PREPARE, SET ROLE, autocommit...); a clean connection is handed out '
           'without a round trip and a dirty one gets the narrowest reset (RESET ALL, UNLISTEN '
           '*, ...). always: DISCARD ALL on every reuse, as stock Odoo (one round trip per '
           'cursor). Use always if custom code changes session state inside SQL functions.'),
    Option('db_pool_reset_every', 'reset_every', _count, 100,
           'a whole number >= 0 (0: never)',
           'With db_pool_reset = smart, every this many reuses a connection gets a full DISCARD '
           'ALL anyway: a safety net for session state no parser can see (a SQL function that '
           'calls set_config, SELECT ... INTO TEMP). Lower it if such code exists.'),
    Option('db_pool_statement_timeout_http', 'statement_timeout_http', seconds, 0.0,
           'a number of seconds >= 0 (0: no limit)',
           'statement_timeout for the transactions of HTTP workers, set with SET LOCAL in the '
           'same round trip as the first statement of each transaction, so it never outlives '
           'the transaction. Stops runaway queries a killed worker would leave running.'),
    Option('db_pool_statement_timeout_cron', 'statement_timeout_cron', seconds, 0.0,
           'a number of seconds >= 0 (0: no limit)',
           'statement_timeout for the transactions of cron workers and cron threads (set like '
           'db_pool_statement_timeout_http). Keep it above the longest legitimate job query.'),
    Option('db_pool_idle_in_transaction_timeout_http', 'idle_in_transaction_timeout_http',
           seconds, 0.0, 'a number of seconds >= 0 (0: no limit)',
           'idle_in_transaction_session_timeout for HTTP transactions (SET LOCAL, per '
           'transaction): the server ends a session whose transaction waits longer than this '
           'between two statements, releasing its locks.'),
    Option('db_pool_idle_in_transaction_timeout_cron', 'idle_in_transaction_timeout_cron',
           seconds, 0.0, 'a number of seconds >= 0 (0: no limit)',
           'idle_in_transaction_session_timeout for cron transactions (SET LOCAL, per '
           'transaction). Jobs that wait on external services inside a transaction need more.'),
    Option('db_direct_host', 'direct_host', _host, None,
           'a host name, IP address or socket directory',
           'PostgreSQL itself, when db_host/db_port point at a transaction-mode pooler '
           '(PgBouncer pool_mode = transaction). Connections that need a real session, those to '
           'the postgres database used by the bus (LISTEN imbus) and cron wake-ups (LISTEN '
           'cron_trigger), and queue_job\'s job runner unless its jobrunner_db_host is set, go '
           'there directly with TCP keepalives (the first two inside the connection budget). '
           'Unset: everything goes to db_host.', shown_default='(unset)'),
    Option('db_direct_port', 'direct_port', _port, None,
           'a port number 1-65535',
           'Port of db_direct_host (default: db_port).', shown_default='(db_port)'),
)

DEFAULT_READONLY_METHODS = (
    'read', 'search', 'search_read', 'search_count', 'read_group', 'name_search', 'name_get',
    'fields_get', 'web_search_read', 'web_read', 'web_read_group', 'check_access_rights')

OPTIONS += (
    Option('db_replicas', 'replicas', parse_replicas, (),
           'host:port[:weight] entries separated by commas (weight a whole number >= 0)',
           'Streaming replicas that serve read-only cursors, chosen at random in proportion to '
           'their weight (default 1; 0 drains a replica). Writes, the postgres database and '
           'everything when no replica is usable go to the primary. The stock '
           'db_replica_host / db_replica_port (Odoo 18+) keep working as a one-replica list.',
           shown_default='(none)'),
    Option('db_replica_ban_time', 'replica_ban_time', seconds, 30.0,
           'a number of seconds >= 0',
           'A replica that refuses connections or fails is given no reads for this long '
           '(doubling on repeated failures up to 4 times this, with 20% jitter), then probed '
           'again in the background. Lower it to get a restarted replica back sooner.'),
    Option('db_replica_max_lag', 'replica_max_lag', seconds, 10.0,
           'a number of seconds >= 0 (0: only replicas that have replayed everything)',
           'A replica whose replay lags the primary by more than this gets no reads until it '
           'catches up. The lag is measured in the background by WAL position, so an idle '
           'primary never makes a replica look late. Raise it for reports that tolerate '
           'older data.'),
    Option('db_replica_read_your_writes', 'replica_read_your_writes', _bool, True,
           'on or off',
           'After an HTTP session commits a write, its read-only cursors only go to a replica '
           'that has replayed that commit (or to the primary), so a user who saves and '
           'reloads never sees the old value. off: reads may be stale by up to the lag.'),
    Option('db_replica_readonly_methods', 'replica_readonly_methods', _names,
           DEFAULT_READONLY_METHODS,
           'model method names separated by commas',
           'Odoo 16/17 only (18+ uses its own @api.readonly): JSON-RPC model methods '
           '(/web/dataset/call_kw and /jsonrpc execute_kw) served from a replica when '
           'db_replicas is set. A method that writes anyway is retried on the primary.',
           shown_default='read, search_read, read_group and the other read methods'),
)

OPTIONS += (
    Option('db_pool_list_dbs_cache', 'list_dbs_cache', seconds, 2.0,
           'a number of seconds >= 0 (0 lists them on every request, as stock Odoo)',
           'Each process keeps the list of databases this long. Stock Odoo lists them (a new '
           'connection to the postgres database, closed at once) on every request without a '
           'session database: JSON-RPC/XML-RPC calls, the login page. A database created or '
           'dropped through another process shows up (or goes) within this delay.'),
    Option('db_pool_retry_terminated', 'retry_terminated', _bool, True,
           'on or off',
           'A request whose server session ended while it ran (its backend terminated, the '
           'server restarted or crashed) runs again on a new connection, at most twice, '
           'when nothing may have been committed in its thread meanwhile, as Odoo runs a '
           'request again after a serialization failure. off: such a request fails, as in '
           'stock Odoo. Turn it off if a module commits through connections of its own '
           '(psycopg2.connect, another thread) in the middle of a request: those commits '
           'are not seen.'),
)

SECRETS = frozenset(('metrics_token',))   # never logged nor shown: as_options() masks them
OPTION_NAMES = tuple(option.name for option in OPTIONS)


@dataclass(frozen=True)
class Settings:
    """Validated db_pooling settings (defaults match :data:`OPTIONS`)."""
    wait_timeout: float = 20.0
    idle_timeout: float = 60.0
    max_lifetime: float = 3600.0
    check_after: float = 30.0
    leak_warn_after: float = 300.0
    shared: bool = True
    max_connections: int = None     # None: computed from the worker counts
    cron_reserve: int = None        # None: 1 with cron workers, else 0
    min_idle: int = 1
    shared_idle: bool = True
    shared_path: str = None         # None: /dev/shm/odoo-db_pooling-<uid>/state-<instance hash>
    metrics_token: str = None       # None: /db_pooling/metrics is off
    reset: str = 'smart'
    reset_every: int = 100
    statement_timeout_http: float = 0.0
    statement_timeout_cron: float = 0.0
    idle_in_transaction_timeout_http: float = 0.0
    idle_in_transaction_timeout_cron: float = 0.0
    direct_host: str = None
    direct_port: int = None
    replicas: tuple = ()            # ((host, port, weight), ...) from db_replicas
    replica_ban_time: float = 30.0
    replica_max_lag: float = 10.0
    replica_read_your_writes: bool = True
    replica_readonly_methods: tuple = DEFAULT_READONLY_METHODS
    list_dbs_cache: float = 2.0
    retry_terminated: bool = True

    def timeouts_prefix(self, role):
        """``SET LOCAL`` statements for the timeouts of ``role`` (http or cron)."""
        return _timeouts_prefix(self, role)

    def as_options(self):
        """``{odoo.conf name: value}``, for logs and the dashboard."""
        return {option.name: ('(set)' if option.field in SECRETS and getattr(self, option.field)
                              else getattr(self, option.field)) for option in OPTIONS}

    def describe(self):
        return ', '.join(f'{name}={value:g}' if isinstance(value, float) else f'{name}={value}'
                         for name, value in self.as_options().items())


def _timeouts_prefix(settings, role):
    parts = []
    for setting, value in (('statement_timeout', getattr(settings, 'statement_timeout_' + role)),
                           ('idle_in_transaction_session_timeout',
                            getattr(settings, 'idle_in_transaction_timeout_' + role))):
        if value:
            parts.append(f"SET LOCAL {setting} = '{max(int(value * 1000), 1)}ms'; ")
    return ''.join(parts)


assert {f.name for f in fields(Settings)} == {o.field for o in OPTIONS}


def load_settings(get, source='odoo.conf'):
    """Build :class:`Settings` from ``get(name) -> raw value or None``.

    ``get`` is typically :meth:`.conf_file.PoolingOptions.get`; ``source``
    names where the values come from in messages: a text, or a function of
    the option's name (:meth:`.conf_file.PoolingOptions.where`). Missing,
    ``None``, empty and ``False`` (Odoo's "not set") mean the default, except
    that ``False`` is "off" for an on/off option (Odoo 16-18 read ``off``
    written as ``False`` so). All bad values are reported together.
    """
    where = source if callable(source) else (lambda name: source)
    values, problems = {}, []
    for option in OPTIONS:
        raw = get(option.name)
        if raw is False and option.parse is _bool:
            values[option.field] = False
            continue
        if raw is None or raw is False or (isinstance(raw, str) and not raw.strip()):
            values[option.field] = option.default
            continue
        try:
            values[option.field] = option.parse(raw)
        except (TypeError, ValueError):
            problems.append(
                f'{option.name} = {raw!r} in {where(option.name)} is not valid: expected '
                f'{option.allowed} (default '
                f'{"computed at start-up" if option.default is None else option.default}).')
    if problems:
        raise ConfigError('db_pooling cannot start: ' + ' '.join(problems)
                          + ' Fix the value or remove the line to use the default.')
    return Settings(**values)


def format_value(value):
    if value is None:
        return '(computed)'
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, tuple):
        return ','.join(':'.join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)
