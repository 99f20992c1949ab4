"""The odoo.conf options db_pooling reads, their defaults and their validation.

Every option lives in the ``[options]`` section of odoo.conf, next to Odoo's
own ``db_*`` options. Odoo stores unknown options as raw strings (16-18 turn
'True'/'False' into booleans), so everything here accepts strings, numbers and
booleans alike and turns them into one frozen :class:`Settings` object.

A bad value never silently falls back to a default: :func:`load_settings`
raises :class:`ConfigError` naming every bad option, its value and what is
allowed, and the addon stops the server with that message.
"""
from dataclasses import dataclass, fields

from .errors import ConfigError

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

OPTION_NAMES = tuple(option.name for option in OPTIONS)


@dataclass(frozen=True)
class Settings:
    """Validated db_pooling settings (defaults match :data:`OPTIONS`)."""
    wait_timeout: float = 20.0
    idle_timeout: float = 60.0
    max_lifetime: float = 3600.0
    check_after: float = 30.0
    leak_warn_after: float = 300.0

    def as_options(self):
        """``{odoo.conf name: value}``, for logs and the dashboard."""
        return {option.name: getattr(self, option.field) for option in OPTIONS}


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
                f'(default {option.default}).')
    if problems:
        raise ConfigError('db_pooling cannot start: ' + ' '.join(problems)
                          + ' Fix the value or remove the line to use the default.')
    return Settings(**values)
