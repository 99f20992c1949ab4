"""odoo.conf.example and the README's option table, generated from the code.

The example lists, by group, every option db_pooling reads: ours (:data:`options.OPTIONS`,
each in the group its name prefix maps to, see :func:`options.group_of`), the TLS options
(:data:`tls.KEYWORDS`, for the primary and the replicas) and the stock Odoo options that
interact with them (:data:`STOCK_OPTIONS`). Regenerate after changing any of them::

    python -m odoo_pool_patch.options > odoo.conf.example
    python -m odoo_pool_patch.options --readme-table    # paste into README.rst
"""
import textwrap
from dataclasses import dataclass

from . import options, tls

# (key, title, what the group is about); groups without options are left out
GROUPS = (
    ('loading', 'loading',
     'db_pooling must be loaded server-wide, or pooling is NOT active (a warning says so).'),
    ('pool', 'pool',
     'The server and each process\'s pool. Stock options keep their meaning; db_pooling adds waiting, idle eviction, lifetimes, '
     'health checks and leak warnings to each process\'s pool.'),
    ('budget', 'shared budget',
     'One connection budget for the HTTP workers, cron workers and the gevent process. '
     'Sizing: keep db_pool_max_connections under the server\'s max_connections minus '
     'superuser_reserved_connections minus what other clients use (README.rst, Sizing).'),
    ('replicas', 'replicas',
     'Read-only cursors go to streaming replicas; writes and everything else to the primary.'),
    ('tls', 'TLS',
     'libpq\'s TLS settings, added to every connection Odoo opens and to the environment of '
     'the pg_dump/psql processes of backups and restores. Checked at start-up: a missing or '
     'unreadable file, a private key readable by group or others, verify-ca/verify-full '
     'without a CA, or an unknown mode stops Odoo with a message naming the option. Managed '
     'databases (RDS, Azure, Cloud SQL): verify-full with the provider\'s CA bundle.'),
    ('pgbouncer', 'PgBouncer-aware',
     'Odoo behind PgBouncer in transaction mode, session reset and per-role timeouts.'),
    ('metrics', 'dashboard and metrics', ''),
)
GROUP_KEYS = tuple(key for key, _, _ in GROUPS)


@dataclass(frozen=True)
class StockOption:
    """A stock Odoo option that interacts with ours (documented, never parsed by us)."""
    name: str
    group: str
    default: str
    doc: str
    example: str = ''       # the value shown on the option's line
    active: bool = False    # written uncommented
    since: int = 16         # first Odoo series that has it


STOCK_OPTIONS = (
    StockOption('server_wide_modules', 'loading', 'base,web (Odoo 19: base,rpc,web)',
                'Modules loaded in every process before any database. Add db_pooling; Odoo '
                '19 serves /jsonrpc from the rpc module, keep it there: '
                'base,rpc,web,db_pooling. The addon is found on addons_path, or as '
                'odoo.addons.db_pooling after pip install into Odoo\'s environment.',
                'base,web,db_pooling', active=True),
    StockOption('db_host', 'pool', 'unset (Unix socket)',
                'Host of the primary server (with PgBouncer: PgBouncer\'s host).',
                '127.0.0.1', active=True),
    StockOption('db_port', 'pool', 'unset (5432)', 'Port of the primary server.', '5432', active=True),
    StockOption('db_user', 'pool', 'unset (the system user)',
                'Database role. Odoo refuses postgres: use a dedicated role.', 'odoo',
                active=True),
    StockOption('db_password', 'pool', 'unset', 'Password of db_user.'),
    StockOption('db_maxconn', 'pool', '64',
                'Most connections ONE process may hold (in use + idle + opening + closing), as '
                'in stock Odoo. Beyond it a borrower waits (db_pool_wait_timeout) instead of '
                'failing at once. Without the shared budget the instance may hold (processes '
                'x db_maxconn): lower it to fit the server.', '64'),
    StockOption('db_maxconn_gevent', 'pool', 'False (use db_maxconn)',
                'Odoo 17+: db_maxconn of the gevent (websocket/longpolling) process.', '16'),
    StockOption('workers', 'budget', '0 (threaded server)',
                'HTTP worker processes. Each takes one slot of the default budget; with 0, '
                'Odoo runs threads in one process and db_maxconn is the budget.', '8'),
    StockOption('max_cron_threads', 'budget', '2',
                'Cron worker processes (threads without workers). Each takes three slots of '
                'the default budget (its LISTEN connection and two per job); the cron reserve '
                'exists when it is above 0.', '1'),
    StockOption('db_replica_host', 'replicas', 'False (no replica)',
                'Odoo 18+: host of a read-only streaming replica; Odoo sends read-only routes '
                'and methods there. Leave it unset rather than empty.', 'replica.example.com'),
    StockOption('db_replica_port', 'replicas', 'False (db_port)', 'Odoo 18+: port of that replica.', '5432'),
    StockOption('db_name', 'pool', 'unset (every database of db_user)',
                'Databases this instance serves (comma-separated). With db_name set and no '
                'dbfilter Odoo takes the list from here, so db_pool_list_dbs_cache has nothing '
                'to cache; otherwise each process keeps the listing db_pool_list_dbs_cache '
                'seconds.'),
    StockOption('db_app_name', 'pool', 'odoo-{pid}',
                'Odoo 19: application_name of Odoo\'s connections (16-18: the ODOO_PGAPPNAME '
                'environment variable). Left at its default, db_pooling names connections '
                'odoo-<role>-<pid> (odoo-http-1234, odoo-cron-1235) so pg_stat_activity and '
                'the dashboard tell workers apart; any other value is kept as it is.',
                since=19),
    StockOption('db_sslmode', 'tls', 'prefer',
                'disable, allow, prefer, require, verify-ca, verify-full. Under prefer libpq '
                'silently falls back to plain text when the server offers no TLS (db_pooling '
                'logs it once per server). Use verify-full whenever the network is not yours.',
                'verify-full'),
)

# libpq TLS settings of tls.KEYWORDS: (example value, meaning)
TLS_DOCS = {
    'sslrootcert': ('/etc/odoo/tls/root.crt',
                    'CA that signed the server certificate (absolute path). Needed by '
                    'verify-ca/verify-full.'),
    'sslcert': ('/etc/odoo/tls/odoo.crt',
                'Client certificate, when the server authenticates by certificate (hostssl ... '
                'cert): its CN must be the database user.'),
    'sslkey': ('/etc/odoo/tls/odoo.key',
               'Private key of db_sslcert: mode 0600, owned by Odoo\'s user.'),
    'sslcrl': ('/etc/odoo/tls/root.crl', 'Certificate revocation list (PEM).'),
    'ssl_min_protocol_version': ('TLSv1.2',
                                 'Lowest TLS version accepted: TLSv1, TLSv1.1, TLSv1.2 (libpq '
                                 'default), TLSv1.3.'),
}
assert set(TLS_DOCS) == set(tls.KEYWORDS)

HEADER = """\
; odoo.conf example for db_pooling. Everything goes in [options], next to Odoo's own options.
; Lines starting with ";" are comments; uncomment an option to change it from its default.
; Generated from the code: python -m odoo_pool_patch.options > odoo.conf.example
; Odoo 19 logs "unknown option ... stored as-is" once for each db_pool_* line: expected,
; Odoo does not know the options of a server-wide module before it loads it.

[options]
"""


def tls_names():
    """The TLS options the code reads (primary and replica), db_sslmode included."""
    names = []
    for prefix in ('db_', 'db_replica_'):
        names += [prefix + 'sslmode'] + [prefix + suffix for suffix in tls.KEYWORDS]
    return names


def documented_names():
    """Every option odoo.conf.example lists."""
    return set(options.OPTION_NAMES) | set(tls_names()) | {o.name for o in STOCK_OPTIONS}


def _comment(text):
    return ['; ' + line for line in textwrap.wrap(text, 92)]


def shown_default(option):
    """The default as the docs show it (shown_default wins: computed or long values)."""
    if option.shown_default:
        return option.shown_default
    if option.default is None:
        return '(computed)'
    unit = ' s' if option.parse is options._seconds else ''
    return options.format_value(option.default) + unit


def _ours(option):
    shown = shown_default(option)
    value = options.format_value(option.default) if option.default is not None else ''
    return _comment(option.doc) + [f'; Default: {shown}. Allowed: {option.allowed}.',
                                   f'; {option.name} = {value}'.rstrip()]


def _stock(option):
    line = f'{"" if option.active else "; "}{option.name} = {option.example}'.rstrip()
    return _comment(f'Stock Odoo option. {option.doc}') + [f'; Default: {option.default}.', line]


def _tls():
    lines = []
    for suffix, (example, doc) in TLS_DOCS.items():
        lines += [''] + _comment(doc) + ['; Default: unset.', f'; db_{suffix} = {example}']
    lines += [''] + _comment('Replicas (db_replica_host, db_replicas): the same settings with '
                             'a db_replica_ prefix, each defaulting to the primary\'s value. '
                             'Set them when the replica has its own CA or mode.')
    lines += [f'; db_replica_{name} =' for name in ['sslmode', *tls.KEYWORDS]]
    return lines


def example_file():
    lines = [HEADER.rstrip('\n')]
    for key, title, intro in GROUPS:
        if not any(o.group == key for o in (*STOCK_OPTIONS, *options.OPTIONS)) and key != 'tls':
            continue
        lines += ['', '; ' + ('-' * 64) + ' ' + title] + (_comment(intro) if intro else [])
        for stock in STOCK_OPTIONS:
            if stock.group == key:
                lines += [''] + _stock(stock)
        if key == 'tls':
            lines += _tls()
        for option in options.OPTIONS:
            if option.group == key:
                lines += [''] + _ours(option)
    return '\n'.join(lines) + '\n'


def readme_table():
    """An RST list-table of our options: name, group, default, first sentence of the doc."""
    titles = {key: title for key, title, _ in GROUPS}
    rows = ['.. list-table::', '   :header-rows: 1', '   :widths: 30 14 14 42', '',
            '   * - option', '     - group', '     - default', '     - meaning']
    for option in sorted(options.OPTIONS, key=lambda o: GROUP_KEYS.index(o.group)):
        shown = shown_default(option)
        first = option.doc.split('. ')[0].rstrip('.') + '.'
        rows += [f'   * - ``{option.name}``', f'     - {titles[option.group]}',
                 f'     - {shown}', f'     - {first}']
    return '\n'.join(rows) + '\n'
