"""TLS to PostgreSQL: libpq's TLS settings from odoo.conf, checked before anything connects.

Stock Odoo only passes ``db_sslmode``, and the replica inherits it: a managed
database in ``verify-full`` mode with its own CA cannot be reached without
environment variables. Here odoo.conf names every libpq TLS file and setting,
for the primary (``db_ssl*``) and for replicas (``db_replica_ssl*``, each
defaulting to the primary's value). They are added to every connection Odoo
opens (through ``connection_info_for``) and to the environment of the
``pg_dump``/``psql`` processes Odoo runs for backups and restores.
"""
import os
import stat

# odoo.conf suffix -> libpq keyword / environment variable
KEYWORDS = {
    'sslrootcert': ('sslrootcert', 'PGSSLROOTCERT'),
    'sslcert': ('sslcert', 'PGSSLCERT'),
    'sslkey': ('sslkey', 'PGSSLKEY'),
    'sslcrl': ('sslcrl', 'PGSSLCRL'),
    'ssl_min_protocol_version': ('ssl_min_protocol_version', 'PGSSLMINPROTOCOLVERSION'),
}
FILES = ('sslrootcert', 'sslcert', 'sslkey', 'sslcrl')
SSLMODES = ('disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full')
PROTOCOLS = ('TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3')


def option_names():
    """Every TLS option read (primary, then replicas), stock Odoo's db_sslmode included."""
    return tuple(prefix + name for prefix in ('db_', 'db_replica_')
                 for name in ('sslmode', *KEYWORDS))


def conf_value(get, name):
    """Option ``name`` as ``get`` (odoo.conf) gives it, stripped; None when unset or empty."""
    value = get(name)
    if value is None or value is False or (isinstance(value, str) and not value.strip()):
        return None
    return str(value).strip()


def tls_keywords(get, replica=False):
    """{libpq keyword: value} for the primary, or for replicas (falling back to the primary's)."""
    keywords = {}
    for suffix, (keyword, _) in KEYWORDS.items():
        value = conf_value(get, 'db_' + suffix)
        if replica:
            value = conf_value(get, 'db_replica_' + suffix) or value
        if value:
            keywords[keyword] = value
    return keywords


def sslmode(get, replica=False):
    mode = conf_value(get, 'db_sslmode') or 'prefer'
    if replica:
        mode = conf_value(get, 'db_replica_sslmode') or mode
    return mode


def validate(get, where=None):
    """Problems with the TLS options, each naming the option and what to do (empty: fine).

    ``where(name)``, when given, names the file and section of an option's value."""
    def at(option):
        return f' in {where(option)}' if where else ''
    problems = []
    for prefix, replica in (('db_', False), ('db_replica_', True)):
        mode = sslmode(get, replica)
        named = prefix + 'sslmode' if conf_value(get, prefix + 'sslmode') else 'db_sslmode'
        if mode not in SSLMODES:
            problems.append(f'{prefix}sslmode = {mode!r}{at(named)} is not a libpq sslmode: use '
                            f'one of {", ".join(SSLMODES)}.')
        keywords = tls_keywords(get, replica)
        for suffix in FILES:
            path = keywords.get(suffix)
            option = prefix + suffix if conf_value(get, prefix + suffix) else 'db_' + suffix
            if path is None:
                continue
            if not os.path.isabs(path):
                problems.append(f'{option} = {path!r}{at(option)} must be an absolute path.')
            elif not os.path.exists(path):
                problems.append(f'{option} = {path}{at(option)} does not exist: fix the path or '
                                f'remove the option.')
            elif not os.access(path, os.R_OK):
                problems.append(f'{option} = {path}{at(option)} is not readable by this user '
                                f'(uid {os.getuid()}): fix its owner or permissions.')
            elif suffix == 'sslkey':
                info = os.stat(path)
                loose = info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
                root_0640 = info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IRWXO)
                if loose and not root_0640:
                    problems.append(
                        f'{option} = {path}{at(option)} is readable by group or others (mode '
                        f'{stat.S_IMODE(info.st_mode):04o}) and libpq refuses such a key: run '
                        f'chmod 600 {path}.')
        if ('sslcert' in keywords) != ('sslkey' in keywords):
            present, missing = ('sslcert', 'sslkey') if 'sslcert' in keywords else ('sslkey',
                                                                                     'sslcert')
            given = prefix + present if conf_value(get, prefix + present) else 'db_' + present
            problems.append(f'{prefix}{missing} is missing: a client certificate needs both '
                            f'{prefix}sslcert and {prefix}sslkey ({given} is set{at(given)}).')
        if mode in ('verify-ca', 'verify-full') and 'sslrootcert' not in keywords \
                and not os.path.exists(os.path.expanduser('~/.postgresql/root.crt')):
            problems.append(f'{prefix}sslmode = {mode}{at(named)} needs the CA that signed the '
                            f'server certificate: set {prefix}sslrootcert to its file (for '
                            f'managed databases, the provider\'s CA bundle).')
        version = keywords.get('ssl_min_protocol_version')
        if version and version not in PROTOCOLS:
            option = prefix + 'ssl_min_protocol_version'
            option = option if conf_value(get, option) else 'db_ssl_min_protocol_version'
            problems.append(f'{prefix}ssl_min_protocol_version = {version!r}{at(option)} is not '
                            f'one of {", ".join(PROTOCOLS)}.')
    return list(dict.fromkeys(problems))      # a primary's file the replicas inherit: once


def pg_environ(get, environ):
    """``environ`` with the primary's TLS settings as libpq variables (pg_dump, psql)."""
    environ = dict(environ)
    if conf_value(get, 'db_sslmode'):
        environ['PGSSLMODE'] = conf_value(get, 'db_sslmode')
    for suffix, (_, variable) in KEYWORDS.items():
        value = conf_value(get, 'db_' + suffix)
        if value:
            environ[variable] = value
    return environ


def explain_failure(exc, info):
    """A clearer message for a TLS handshake failure, or None when it is not one."""
    text = str(exc).strip()
    lowered = text.lower()
    if not any(word in lowered for word in ('ssl', 'certificate', 'tls')):
        return None
    if 'does not match host name' in lowered or 'hostname' in lowered:
        reason = ('the server certificate is not for this host name: connect with the name in '
                  'the certificate (db_host) or use verify-ca')
    elif 'certificate verify failed' in lowered or 'unknown ca' in lowered \
            or 'self-signed' in lowered or 'self signed' in lowered:
        reason = 'the server certificate is not signed by the CA in db_sslrootcert'
    elif 'expired' in lowered:
        reason = 'a certificate has expired'
    elif 'server does not support ssl' in lowered:
        reason = 'the server does not accept TLS: enable ssl there or lower db_sslmode'
    elif 'certificate' in lowered and ('required' in lowered or 'authentication' in lowered):
        reason = ('the server wants a client certificate: set db_sslcert and db_sslkey (its CN '
                  'must be the database user)')
    else:
        reason = 'see the libpq message above'
    return (f'{text}\nTLS connection to {info.get("host", "local socket")}:'
            f'{info.get("port", 5432)} with sslmode={info.get("sslmode", "prefer")} failed: '
            f'{reason}.')


# (host, port) -> what the last connection to that server negotiated, for the dashboard.
SERVERS = {}


def record(cnx, info):
    """Note the TLS state of a new connection (no round trip: libpq knows it)."""
    server = (str(info.get('host', 'local socket')), str(info.get('port', 5432)))
    try:
        in_use = bool(cnx.info.ssl_in_use)
        protocol = cnx.info.ssl_attribute('protocol') if in_use else None
        cipher = cnx.info.ssl_attribute('cipher') if in_use else None
    except Exception:           # libpq or psycopg2 too old to tell
        return None
    mode = info.get('sslmode', 'prefer')
    state = {'sslmode': mode, 'encrypted': in_use, 'protocol': protocol, 'cipher': cipher,
             # prefer/allow fall back to plain text silently: flag it
             'flagged': not in_use and mode in ('allow', 'prefer')}
    if SERVERS.get(server) != state:
        SERVERS[server] = state
        if state['flagged']:
            import logging
            logging.getLogger('odoo.sql_db.pool').info(
                'Connections to %s:%s are not encrypted: db_sslmode = %s lets libpq fall back '
                'to plain text. Set db_sslmode = verify-full (with db_sslrootcert) to insist on '
                'TLS.', server[0], server[1], mode)
    return state
