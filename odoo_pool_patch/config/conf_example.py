"""odoo.conf.example and the option reference of docs/configuration.rst, generated from the code.

The example lists, by group, every option db_pooling reads: ours (:data:`options.OPTIONS`,
each in the group its name prefix maps to, see :func:`options.group_of`), the TLS options
(:data:`tls.KEYWORDS`, for the primary and the replicas) and the stock Odoo options that
interact with them (:data:`.stock_options.STOCK_OPTIONS`). Regenerate after changing any of them::

    python -m odoo_pool_patch.config.conf_example > odoo.conf.example
    python -m odoo_pool_patch.config.conf_example --reference-into docs/configuration.rst

The second rewrites docs/configuration.rst from the line :data:`REFERENCE_MARK` to the end
(``--reference`` prints that part instead).
"""
import re
import sys
import textwrap

from . import options, tls
from .conf_file import NAMES, SECTION
from .stock_options import STOCK_OPTIONS

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
     'superuser_reserved_connections minus what other clients use (docs/sizing.rst).'),
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
; odoo.conf example for db_pooling. Odoo's own options go in [options]; db_pooling's in a
; [db_pooling] section of the same file, which Odoo leaves alone and db_pooling reads itself
; (in [options] they still work, but Odoo 19 logs "unknown option" for each and db_pooling
; logs a note to move them).
; Lines starting with ";" are comments; uncomment an option to change it from its default.
; Generated from the code: python -m odoo_pool_patch.config.conf_example > odoo.conf.example
"""


def documented_names():
    """Every option odoo.conf.example lists."""
    return set(options.OPTION_NAMES) | set(tls.option_names()) | {o.name for o in STOCK_OPTIONS}


def _comment(text):
    return ['; ' + line for line in textwrap.wrap(text, 92)]


def shown_default(option):
    """The default as the docs show it (shown_default wins: computed or long values)."""
    if option.shown_default:
        return option.shown_default
    if option.default is None:
        return '(computed)'
    unit = ' s' if option.parse is options.seconds else ''
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


def _stock_lines(key):
    return [line for stock in STOCK_OPTIONS if stock.group == key for line in ['', *_stock(stock)]]


def _our_lines(key):
    lines = _tls() if key == 'tls' else []
    return lines + [line for option in options.OPTIONS if option.group == key
                    for line in ['', *_ours(option)]]


def example_file():
    """Odoo's options in [options], then ours in [db_pooling], each by group; a group's
    introduction where it first appears."""
    lines, introduced = [HEADER.rstrip('\n')], set()
    for section, group_lines in (('options', _stock_lines), (SECTION, _our_lines)):
        lines += ['', f'[{section}]']
        for key, title, intro in GROUPS:
            body = group_lines(key)
            if not body:
                continue
            lines += ['', '; ' + ('-' * 64) + ' ' + title]
            if intro and key not in introduced:
                lines += _comment(intro)
                introduced.add(key)
            lines += body
    return '\n'.join(lines) + '\n'


REFERENCE_MARK = '.. Everything below is generated from the code: do not edit it by hand.'

# TLS settings: what the start-up check (tls.validate) allows
TLS_ALLOWED = {
    'sslrootcert': 'an absolute path to a file Odoo\'s user can read',
    'sslcert': 'an absolute path to a file Odoo\'s user can read; set with db_sslkey',
    'sslkey': 'an absolute path to a file Odoo\'s user can read, not readable by group or '
              'others (mode 0600; 0640 owned by root); set with db_sslcert',
    'sslcrl': 'an absolute path to a file Odoo\'s user can read',
    'ssl_min_protocol_version': ', '.join(tls.PROTOCOLS),
}
assert set(TLS_ALLOWED) == set(tls.KEYWORDS)


def _rst_text(text):
    """Plain option documentation as reStructuredText: option names as literals, markup escaped."""
    text = re.sub(r'([*`|\\])', r'\\\1', text)
    return re.sub(r'\b(db_(?!pooling\b)[a-z0-9_]+)', r'``\1``', text)


def _section(name, doc, fields):
    fields = [('Section', f'[{SECTION if name in NAMES else "options"}]'), *fields]
    lines = ['', f'``{name}``', '~' * (len(name) + 4), '']
    lines += textwrap.wrap(_rst_text(doc), 92, break_on_hyphens=False, break_long_words=False)
    lines += ['']
    lines += [f':{label}: ``{value}``' if label == 'Example' else f':{label}: {_rst_text(value)}'
              for label, value in fields if value]
    return lines


def reference_sections():
    """{option name: its section}, for every option odoo.conf.example lists."""
    titles = {key: title for key, title, _ in GROUPS}
    sections = {}
    for option in options.OPTIONS:
        sections[option.name] = _section(option.name, option.doc, [
            ('Group', titles[option.group]), ('Default', shown_default(option)),
            ('Allowed', option.allowed),
            ('Example', f'{option.name} = {options.format_value(option.default)}'
             if option.default not in (None, ()) else '')])
    for stock in STOCK_OPTIONS:
        sections[stock.name] = _section(stock.name, f'Stock Odoo option. {stock.doc}', [
            ('Group', titles[stock.group]), ('Default', stock.default),
            ('Since', f'Odoo {stock.since}.0' if stock.since > 16 else ''),
            ('Example', f'{stock.name} = {stock.example}' if stock.example else '')])
    modes = ', '.join(tls.SSLMODES)
    sections['db_replica_sslmode'] = _section('db_replica_sslmode', 'db_sslmode for replicas '
                                              '(db_replica_host, db_replicas).', [
        ('Group', 'TLS'), ('Default', 'the value of db_sslmode'), ('Allowed', modes)])
    for suffix, (example, doc) in TLS_DOCS.items():
        sections['db_' + suffix] = _section('db_' + suffix, doc, [
            ('Group', 'TLS'), ('Default', 'unset'), ('Allowed', TLS_ALLOWED[suffix]),
            ('Example', f'db_{suffix} = {example}')])
        sections['db_replica_' + suffix] = _section(
            'db_replica_' + suffix, f'db_{suffix} for replicas (db_replica_host, db_replicas). '
            'Set it when the replica has its own CA or needs another client certificate.', [
                ('Group', 'TLS'), ('Default', f'the value of db_{suffix}'),
                ('Allowed', TLS_ALLOWED[suffix])])
    return sections


def reference_rst():
    """The option reference of docs/configuration.rst: one section per option, by group."""
    sections = reference_sections()
    assert set(sections) == documented_names()
    lines = [REFERENCE_MARK, '.. Regenerate: python -m odoo_pool_patch.config.conf_example '
             '--reference-into docs/configuration.rst', '', 'Reference', '=========', '']
    lines += textwrap.wrap('Every option db_pooling reads, by group: ours, the TLS options and '
                           'the stock Odoo options that interact with them. The same text is in '
                           'odoo.conf.example.', 92)
    for key, title, intro in GROUPS:
        names = [o.name for o in STOCK_OPTIONS if o.group == key]
        if key == 'tls':
            names += ['db_replica_sslmode']
            for suffix in tls.KEYWORDS:
                names += ['db_' + suffix, 'db_replica_' + suffix]
        names += [o.name for o in options.OPTIONS if o.group == key]
        if not names:
            continue
        heading = title[0].upper() + title[1:]
        lines += ['', heading, '-' * len(heading)]
        if intro:
            lines += [''] + textwrap.wrap(_rst_text(intro), 92, break_on_hyphens=False)
        for name in names:
            lines += sections[name]
    return '\n'.join(lines) + '\n'


def write_reference(path):
    """Replace everything from :data:`REFERENCE_MARK` to the end of ``path`` with the reference."""
    with open(path) as handle:
        text = handle.read()
    start = text.find(REFERENCE_MARK)
    if start < 0:
        raise SystemExit(f'{path} has no line {REFERENCE_MARK!r}: add it where the reference goes')
    with open(path, 'w') as handle:
        handle.write(text[:start] + reference_rst())


def main(argv):
    if argv[:1] == ['--reference-into'] and len(argv) == 2:
        write_reference(argv[1])      # docs/configuration.rst
    elif argv == ['--reference']:
        print(reference_rst(), end='')
    elif argv:
        sys.exit('usage: python -m odoo_pool_patch.config.conf_example [--reference | '
                 '--reference-into docs/configuration.rst]')
    else:
        print(example_file(), end='')


if __name__ == '__main__':       # python -m odoo_pool_patch.config.conf_example > odoo.conf.example
    main(sys.argv[1:])
