"""``odoo-pool check -c odoo.conf``: validate a configuration without starting Odoo.

Checks, in order, and reports every problem (exit status 1 if any):
option values, TLS files, connectivity and TLS to the primary (and the
Odoo 18+ replica when ``db_replica_host`` is set), and the budget against
the server's ``max_connections`` minus ``superuser_reserved_connections``.
"""
import argparse
import sys

import psycopg2

from ..config import conf_file, tls
from ..config.options import load_settings
from ..errors import ConfigError
from ..odoo_glue.odoo_install import default_budget, process_count, server_limits


def read_config(path):
    """The options of the odoo.conf at ``path`` (conf_file.PoolingOptions): [db_pooling] first,
    then [options]."""
    try:
        source = conf_file.from_file(path)
    except ConfigError as exc:
        raise SystemExit(f'odoo-pool check: {exc}') from None
    if not source.has_options:
        raise SystemExit(f'odoo-pool check: {path} has no [options] section')
    return source


def server_info(get, replica=False):
    prefix = 'db_replica_' if replica else 'db_'
    info = {'dbname': 'postgres', 'application_name': 'odoo-pool-check',
            'sslmode': tls.sslmode(get, replica), **tls.tls_keywords(get, replica)}
    for name in ('host', 'port', 'user', 'password'):
        value = get(prefix + name) or (get('db_' + name) if replica else None)
        if value:
            info[name] = value
    return info


def probe(info):
    """(max_connections - superuser_reserved, TLS description) of the server, or raises."""
    cnx = psycopg2.connect(**info)
    try:
        max_connections, reserved = server_limits(cnx)
        if cnx.info.ssl_in_use:
            secured = (f"TLS {cnx.info.ssl_attribute('protocol')} "
                       f"{cnx.info.ssl_attribute('cipher')}")
        else:
            secured = 'NOT encrypted'
        return max_connections - reserved, secured
    finally:
        cnx.close()


def replica_targets(get, settings):
    """The replicas of db_replicas (or the stock db_replica_host) as replicas.Target."""
    from ..config.options import Settings
    from ..replicas.router import targets_from_config
    try:
        return targets_from_config(settings or Settings(), get)[1:]
    except ConfigError:
        return []


def check_replication(info, replica, primary_lsn, where, ok, bad):
    """A replica must be in recovery; report how far it is behind the primary. Returns
    the primary's WAL position (read when ``replica`` is False)."""
    from ..replicas.replica_health import PRIMARY_SQL, REPLICA_SQL
    cnx = psycopg2.connect(**info)
    try:
        with cnx.cursor() as cur:
            cur.execute(REPLICA_SQL if replica else PRIMARY_SQL)
            row = cur.fetchone()
    finally:
        cnx.close()
    if not replica:
        return row[0]
    in_recovery, replay_lsn = row[0], row[1]
    if not in_recovery:
        bad(f'{where}: is not a replica (pg_is_in_recovery() is false): remove it from '
            f'db_replicas, or it would serve reads that may miss the primary\'s writes')
    elif primary_lsn is not None:
        ok(f'{where}: streaming replica, {max(primary_lsn - replay_lsn, 0)} bytes of WAL '
           f'behind the primary')
    return primary_lsn


def run(path, out=sys.stdout):
    source = read_config(path)
    get = source.get
    problems = []

    def ok(text):
        print(f'ok      {text}', file=out)

    def bad(text):
        problems.append(text)
        print(f'PROBLEM {text}', file=out)

    for text in source.problems:
        bad(text)
    for text in source.notes():
        print(f'note    {text}', file=out)
    try:
        settings = load_settings(get, source=source.where)
        ok('db_pool_* option values')
    except ConfigError as exc:
        settings = None
        bad(str(exc))
    tls_problems = tls.validate(get, where=source.where)
    for problem in tls_problems:
        bad(problem)
    if not tls_problems:
        ok('TLS options and files')

    replicas = replica_targets(get, settings)
    targets = [('primary', False, None)] + [('replica', True, t) for t in replicas]
    allowed = primary_lsn = None
    for label, replica, target in targets:
        info = server_info(get, replica)
        if target is not None:
            info.pop('host', None)
            info.update({'port': target.port, **({'host': target.host} if target.host else {})})
        where = f"{label} {info.get('host', 'local socket')}:{info.get('port', 5432)}"
        try:
            server_allowed, secured = probe(info)
        except psycopg2.Error as exc:
            explained = tls.explain_failure(exc, info)
            bad(f'{where}: cannot connect: {(explained or str(exc)).strip()}')
            continue
        if not replica:
            allowed = server_allowed
        try:
            primary_lsn = check_replication(info, replica, primary_lsn, where, ok, bad)
        except psycopg2.Error as exc:
            bad(f'{where}: cannot read its WAL position: {str(exc).strip()}')
        if secured == 'NOT encrypted' and info['sslmode'] in ('allow', 'prefer'):
            ok(f'{where}: connected, {secured} (db_sslmode = {info["sslmode"]} falls back to '
               f'plain text; use verify-full to insist on TLS)')
        else:
            ok(f'{where}: connected, {secured}')

    if settings is not None and allowed is not None:
        workers = int(get('workers') or 0)
        cron = int(get('max_cron_threads', 2) or 0)
        maxconn = int(get('db_maxconn') or 64)
        if settings.shared:
            wanted = settings.max_connections or default_budget(workers, cron, maxconn)
            what = f'budget {wanted} (db_pool_max_connections)'
        else:
            wanted = process_count(workers, cron) * maxconn
            what = f'worst case {wanted} without a shared budget (processes x db_maxconn)'
        if wanted > allowed:
            bad(f'{what} exceeds what the primary accepts: {allowed} (max_connections - '
                f'superuser_reserved_connections): lower db_pool_max_connections or raise '
                f'max_connections')
        else:
            ok(f'{what} fits in the {allowed} connections the primary accepts')
    print(f'{len(problems)} problem(s) in {path}' if problems else f'{path}: all checks passed',
          file=out)
    return 1 if problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog='odoo-pool check', description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', required=True, help='the odoo.conf to check')
    args = parser.parse_args(argv)
    return run(args.config)


if __name__ == '__main__':
    sys.exit(main())
