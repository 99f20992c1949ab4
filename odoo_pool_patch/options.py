"""The odoo.conf options db_pooling reads, their defaults and their validation.

Every option lives in the ``[options]`` section of odoo.conf, next to Odoo's
own ``db_*`` options. Odoo stores unknown options as raw strings (16-18 turn
'True'/'False' into booleans), so everything here accepts strings, numbers and
booleans alike and turns them into one frozen :class:`Settings` object.

A bad value never silently falls back to a default: :func:`load_settings`
raises :class:`ConfigError` naming every bad option, its value and what is
allowed, and the addon stops the server with that message.
"""
import os
from dataclasses import dataclass, fields

from .errors import ConfigError

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


def _seconds(value):
    number = float(value)
    if number != number or number < 0 or number == float('inf'):
        raise ValueError
    return number


@dataclass(frozen=True)
class Option:
    name: str            # key in odoo.conf [options]
    field: str           # attribute of Settings
    parse: callable
    default: object
    allowed: str         # what the error message says is allowed
    doc: str             # meaning and when to change it (odoo.conf.example, README)
    shown_default: str = None   # how the docs show a None default (else "(computed)")


OPTIONS = (
    Option('db_pool_wait_timeout', 'wait_timeout', _seconds, 20.0,
           'a number of seconds >= 0',
           'How long a borrower waits for a free connection when the pool is at its limit '
           'before PoolError is raised. 0 restores stock behaviour (fail at once). Raise it '
           'if legitimate bursts time out; lower it to fail fast behind a load balancer.'),
    Option('db_pool_idle_timeout', 'idle_timeout', _seconds, 60.0,
           'a number of seconds >= 0 (0 keeps idle connections forever)',
           'An idle connection unused for this long is closed by the maintenance timer. '
           'Stock Odoo keeps them 600 s. Lower it to give slots back to PostgreSQL sooner; '
           'raise it if connecting is expensive (TLS over a slow link).'),
    Option('db_pool_max_lifetime', 'max_lifetime', _seconds, 3600.0,
           'a number of seconds >= 0 (0 means no limit)',
           'A connection older than this (minus up to 10% random jitter, so they do not all '
           'recycle at once) is closed when idle. Bounds server-side memory growth of long '
           'sessions and lets DNS or failover changes take effect.'),
    Option('db_pool_check_after', 'check_after', _seconds, 30.0,
           'a number of seconds >= 0',
           'A connection idle for longer than this gets a round trip before it is handed '
           'out; a dead one is replaced without the caller seeing an error. Every reuse is '
           'first checked for a closed socket (no round trip). While every reused connection '
           'is reset as stock Odoo does (DISCARD ALL), that reset is the round trip, so every '
           'reuse is checked; this bound applies to connections handed out without a reset.'),
    Option('db_pool_leak_warn_after', 'leak_warn_after', _seconds, 300.0,
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
    Option('db_pool_shared_path', 'shared_path', _path, None,
           'an absolute file path',
           'File holding the shared state (about 150 kB). Default: a file in /dev/shm named '
           'after the config file and database server, so the processes of one instance find '
           'it. Set the same path on a volume shared by several Odoo containers of one host to '
           'give them one budget.'),
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

OPTIONS += (
    Option('db_pool_list_dbs_cache', 'list_dbs_cache', _seconds, 2.0,
           'a number of seconds >= 0 (0 lists them on every request, as stock Odoo)',
           'Each process keeps the list of databases this long. Stock Odoo lists them (a new '
           'connection to the postgres database, closed at once) on every request without a '
           'session database: JSON-RPC/XML-RPC calls, the login page. A database created or '
           'dropped through another process shows up (or goes) within this delay.'),
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
    shared_path: str = None         # None: /dev/shm/odoo-db_pooling-<instance hash>
    metrics_token: str = None       # None: /db_pooling/metrics is off
    list_dbs_cache: float = 2.0

    def as_options(self):
        """``{odoo.conf name: value}``, for logs and the dashboard."""
        return {option.name: ('(set)' if option.field in SECRETS and getattr(self, option.field)
                              else getattr(self, option.field)) for option in OPTIONS}

    def describe(self):
        return ', '.join(f'{name}={value:g}' if isinstance(value, float) else f'{name}={value}'
                         for name, value in self.as_options().items())


assert {f.name for f in fields(Settings)} == {o.field for o in OPTIONS}


def load_settings(get, source='odoo.conf [options]'):
    """Build :class:`Settings` from ``get(name) -> raw value or None``.

    ``get`` is typically ``odoo.tools.config.get``. Missing, ``None`` and
    ``False`` (Odoo's "not set") mean the default. All bad values are
    reported together.
    """
    values, problems = {}, []
    for option in OPTIONS:
        raw = get(option.name)
        if raw is None or raw is False or (isinstance(raw, str) and not raw.strip()):
            values[option.field] = option.default
            continue
        try:
            values[option.field] = option.parse(raw)
        except (TypeError, ValueError):
            problems.append(
                f'{option.name} = {raw!r} in {source} is not valid: expected {option.allowed} '
                f'(default {"computed at start-up" if option.default is None else option.default}).')
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
    return str(value)


def example_section():
    """The db_pool_* part of odoo.conf.example, from :data:`OPTIONS` (so docs cannot drift)."""
    import textwrap
    lines = []
    for option in OPTIONS:
        lines.append('')
        lines.extend('; ' + line for line in textwrap.wrap(option.doc, 92))
        unit = ' s' if option.parse is _seconds else ''
        shown = option.shown_default if option.default is None and option.shown_default \
            else format_value(option.default) + (unit if option.default is not None else '')
        lines.append(f'; Default: {shown}. Allowed: {option.allowed}.')
        value = format_value(option.default) if option.default is not None else ''
        lines.append(f'; {option.name} = {value}'.rstrip())
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':       # python -m odoo_pool_patch.options > section
    print(example_section(), end='')
