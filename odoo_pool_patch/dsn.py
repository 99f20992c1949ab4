"""DSN comparison, as stock Odoo's ``ConnectionPool._dsn_equals`` does it.

A DSN is either Odoo's ``connection_info`` dict (keywords, or a single
``dsn`` URI) or a libpq string. Two DSNs are equal when they name the same
keywords with the same values, ``dbname`` being an alias of ``database`` and
the password being ignored. :func:`dsn_key` turns a DSN into a hashable key
so that the pool finds idle connections with a dict lookup instead of
comparing strings.
"""
from psycopg2.extensions import parse_dsn

_ALIASES = {'dbname': 'database'}
_IGNORED = frozenset(('password',))


def _items(dsn):
    if isinstance(dsn, str):
        dsn = parse_dsn(dsn)
    elif 'dsn' in dsn:
        # Odoo's URI form {'dsn': 'postgresql://...', 'application_name': ...}
        merged = parse_dsn(dsn['dsn'])
        merged.update((k, v) for k, v in dsn.items() if k != 'dsn')
        dsn = merged
    for key, value in dsn.items():
        if key not in _IGNORED and value is not None:
            yield _ALIASES.get(key, key), str(value)


def dsn_key(dsn):
    """Hashable identity of a DSN (dict or string), password left out."""
    return tuple(sorted(_items(dsn)))


def dsn_equals(dsn1, dsn2):
    return dsn_key(dsn1) == dsn_key(dsn2)


def key_database(key):
    """The database name of a key made by :func:`dsn_key`, or ``'?'``."""
    for name, value in key:
        if name == 'database':
            return value
    return '?'
