"""The deployment kit (docker-compose.yml and docker/) stays true without Docker.

The scripts the containers run are run here against local clusters, as the
postgres user, with paths and ports passed by environment variables: the
primary's init script, the replica bootstrap, the server TLS installer, the
certificate script, and PgBouncer's configuration with a real pgbouncer. The
compose files are parsed and every service, volume, file, script and odoo.conf
option they reference is checked.
"""
import configparser
import os
import re
import shlex
import shutil
import subprocess
import time

import psycopg2
import pytest
import yaml

from odoo_pool_patch.config import tls
from odoo_pool_patch.config.stock_options import STOCK_OPTIONS
from odoo_pool_patch.devtools.embedded_pg import Cluster, free_port
from odoo_pool_patch.config.options import OPTION_NAMES

from testkit import ROOT

DOCKER = os.path.join(ROOT, 'docker')
SERVER_USER = 'postgres'

def as_server_user(cmd):
    return ['runuser', '-u', SERVER_USER, '--', *cmd] if os.geteuid() == 0 else cmd


def run_script(path, cwd, user=SERVER_USER, timeout=180, **env):
    """Run one of docker/'s scripts with only ``env`` (plus PATH with the server binaries)."""
    from odoo_pool_patch.devtools.embedded_pg import find_bindir
    environment = {'PATH': find_bindir() + ':/usr/sbin:/usr/bin:/sbin:/bin', 'LC_ALL': 'C'}
    environment.update(env)
    cmd = [os.path.join(DOCKER, path)]
    if user == SERVER_USER:
        cmd = as_server_user(cmd)
    return subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ---------------------------------------------------------------- primary and replica scripts

@pytest.fixture
def image_like_primary():
    """A primary whose pg_hba.conf is like the official image's: trusted socket, passwords
    over the network, no replication rule (so only primary-init.sh can allow replicas)."""
    cluster = Cluster('deploy-primary').init()
    with open(os.path.join(cluster.datadir, 'pg_hba.conf'), 'w') as handle:
        handle.write('local all all trust\n'
                     'host all postgres 127.0.0.1/32 trust\n'     # the test's own admin link
                     'host all all all scram-sha-256\n')
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_primary_init_and_replica_bootstrap_build_a_streaming_replica(image_like_primary):
    primary = image_like_primary
    replica = Cluster('deploy-replica')          # not initialised: the bootstrap makes it
    secret = "s3cret 'quoted' pass"
    replication = dict(REPLICATION_USER='replicator', REPLICATION_PASSWORD=secret)
    bootstrap_env = dict(replication, PGDATA=replica.datadir, PRIMARY_HOST='127.0.0.1',
                         PRIMARY_PORT=str(primary.port), REPLICATION_SLOT='replica1',
                         BOOTSTRAP_TIMEOUT='10')
    init_env = dict(replication, PGDATA=primary.datadir, PGHOST=primary.sockdir,
                    PGPORT=str(primary.port), POSTGRES_USER=SERVER_USER,
                    REPLICATION_SLOTS='replica1 spare', REPLICATION_NETWORK='127.0.0.1/32')
    try:
        refused = run_script('postgres/replica-bootstrap.sh', replica.base, **bootstrap_env)
        assert refused.returncode != 0          # no role, no pg_hba rule yet

        ok(run_script('postgres/primary-init.sh', primary.base, **init_env))
        ok(run_script('postgres/primary-init.sh', primary.base, **init_env))   # idempotent
        with open(os.path.join(primary.datadir, 'pg_hba.conf')) as handle:
            assert handle.read().count('host replication replicator 127.0.0.1/32 scram') == 1
        primary.restart()
        assert primary.sql('SHOW max_slot_wal_keep_size') == [('2GB',)]
        assert primary.sql("SELECT rolreplication FROM pg_roles WHERE rolname = 'replicator'") \
            == [(True,)]
        assert sorted(primary.sql('SELECT slot_name FROM pg_replication_slots')) == \
            [('replica1',), ('spare',)]
        primary.sql('CREATE TABLE copied AS SELECT 1 AS one')

        out = ok(run_script('postgres/replica-bootstrap.sh', replica.base, **bootstrap_env))
        assert 'is a standby of' in out
        replica._configure()                     # its own port and socket on this machine
        replica.start()
        assert replica.sql('SELECT pg_is_in_recovery()') == [(True,)]
        assert replica.sql('SELECT one FROM copied') == [(1,)]
        primary.sql('CREATE TABLE streamed AS SELECT 42 AS answer')
        assert replica.wait_until(lambda: replica.sql(
            "SELECT to_regclass('streamed') IS NOT NULL")[0][0], timeout=60)
        assert replica.sql('SELECT answer FROM streamed') == [(42,)]
        assert primary.sql("SELECT usename, state FROM pg_stat_replication") == \
            [('replicator', 'streaming')]
        assert primary.sql("SELECT active FROM pg_replication_slots "
                           "WHERE slot_name = 'replica1'") == [(True,)]

        replica.stop()                           # later starts keep the data as it is
        again = ok(run_script('postgres/replica-bootstrap.sh', replica.base, **bootstrap_env))
        assert 'already holds a cluster' in again
    finally:
        replica.destroy()


def test_scripts_name_a_missing_setting():
    out = run_script('postgres/primary-init.sh', '/', PGDATA='/nonexistent')
    assert out.returncode != 0 and 'REPLICATION_PASSWORD is not set' in out.stderr
    out = run_script('postgres/replica-bootstrap.sh', '/', PGDATA='/nonexistent')
    assert out.returncode != 0 and 'PRIMARY_HOST must name the primary' in out.stderr


# ---------------------------------------------------------------- TLS

def make_certs(directory, **env):
    return ok(subprocess.run([os.path.join(DOCKER, 'make-certs.sh'), str(directory)],
                             env=dict(os.environ, **env), capture_output=True, text=True))


@pytest.mark.skipif(not shutil.which('openssl'), reason='openssl not installed')
def test_make_certs_gives_a_server_that_verify_full_accepts(tmp_path):
    certs = tmp_path / 'certs'
    make_certs(certs)
    ca = (certs / 'ca.crt').read_bytes()
    make_certs(certs)                            # a second run keeps the CA
    assert (certs / 'ca.crt').read_bytes() == ca
    assert oct(os.stat(certs / 'server.key').st_mode & 0o777) == '0o600'
    wrong_names = tmp_path / 'wrong'
    make_certs(wrong_names, SERVER_NAMES='db db-replica')

    cluster = Cluster('deploy-tls')
    try:
        tls_dir = os.path.join(cluster.base, 'tls')
        owner = SERVER_USER if os.geteuid() == 0 else os.environ.get('USER', 'root')
        ok(subprocess.run([os.path.join(DOCKER, 'postgres', 'install-server-tls.sh'),
                           str(certs), tls_dir], env=dict(os.environ, OWNER=owner),
                          capture_output=True, text=True))
        cluster.settings.update({'ssl': 'on', 'ssl_cert_file': f"'{tls_dir}/server.crt'",
                                 'ssl_key_file': f"'{tls_dir}/server.key'",
                                 'ssl_ca_file': f"'{tls_dir}/ca.crt'"})
        cluster.init().start()
        for host in ('localhost', '127.0.0.1'):
            cnx = psycopg2.connect(host=host, port=cluster.port, dbname='postgres',
                                   user=SERVER_USER, sslmode='verify-full',
                                   sslrootcert=str(certs / 'ca.crt'))
            with cnx.cursor() as cur:
                cur.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')
                assert cur.fetchone() == (True,)
            cnx.close()
        # the same CA with a certificate that does not name localhost: refused
        ok(subprocess.run([os.path.join(DOCKER, 'postgres', 'install-server-tls.sh'),
                           str(wrong_names), tls_dir], env=dict(os.environ, OWNER=owner),
                          capture_output=True, text=True))
        cluster.reload()
        with pytest.raises(psycopg2.OperationalError, match='does not match host name'):
            psycopg2.connect(host='localhost', port=cluster.port, dbname='postgres',
                             user=SERVER_USER, sslmode='verify-full',
                             sslrootcert=str(wrong_names / 'ca.crt'))
    finally:
        cluster.destroy()


def test_install_server_tls_says_what_is_missing(tmp_path):
    out = subprocess.run([os.path.join(DOCKER, 'postgres', 'install-server-tls.sh'),
                          str(tmp_path), str(tmp_path / 'out')], capture_output=True, text=True)
    assert out.returncode != 0 and 'run docker/make-certs.sh first' in out.stderr


# ---------------------------------------------------------------- PgBouncer

@pytest.mark.skipif(not os.path.exists('/usr/sbin/pgbouncer'), reason='pgbouncer not installed')
def test_pgbouncer_ini_runs_transaction_pooling_with_the_stack_password(pg):
    """The stack's pgbouncer.ini and userlist.txt with a real pgbouncer; only the server
    address, the listening port and the socket directory are changed."""
    import pathlib
    import tempfile
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix='dbpool-pgbouncer-'))  # readable by postgres
    port = free_port()
    ini = open(os.path.join(DOCKER, 'pgbouncer', 'pgbouncer.ini')).read()
    ini, count = re.subn(r'(?m)^\* = host=db port=5432$', f'* = host=127.0.0.1 port={pg.port}', ini)
    assert count == 1
    ini = re.sub(r'(?m)^listen_port = 6432$', f'listen_port = {port}', ini)
    ini = re.sub(r'(?m)^unix_socket_dir = .*$', f'unix_socket_dir = {tmp_path}', ini)
    ini = ini.replace('/etc/pgbouncer/userlist.txt', str(tmp_path / 'userlist.txt'))
    (tmp_path / 'pgbouncer.ini').write_text(ini)
    shutil.copy(os.path.join(DOCKER, 'pgbouncer', 'userlist.txt'), tmp_path / 'userlist.txt')
    os.chmod(tmp_path, 0o755)
    if os.geteuid() == 0:
        for path in (tmp_path, tmp_path / 'pgbouncer.ini', tmp_path / 'userlist.txt'):
            shutil.chown(path, SERVER_USER)
    password = read_env('postgres.env')['POSTGRES_PASSWORD']
    proc = subprocess.Popen(as_server_user(['/usr/sbin/pgbouncer', str(tmp_path / 'pgbouncer.ini')]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cnx = None
        deadline = time.monotonic() + 30
        while cnx is None:
            try:
                cnx = psycopg2.connect(host='127.0.0.1', port=port, dbname='db1', user='odoo',
                                       password=password, application_name='deploy-kit')
            except psycopg2.OperationalError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise AssertionError('pgbouncer did not accept: ' + proc.communicate()[0])
                time.sleep(0.2)
        with cnx.cursor() as cur:
            cur.execute('SELECT current_database(), current_user')
            assert cur.fetchone() == ('db1', 'odoo')
        cnx.close()
        with pytest.raises(psycopg2.OperationalError, match='authentication failed'):
            psycopg2.connect(host='127.0.0.1', port=port, dbname='db1', user='odoo',
                             password='wrong')
        admin = psycopg2.connect(host='127.0.0.1', port=port, dbname='pgbouncer', user='odoo',
                                 password=password)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute('SHOW POOLS')
            columns = [c.name for c in cur.description]
            modes = {row[columns.index('database')]: row[columns.index('pool_mode')]
                     for row in cur.fetchall()}
        admin.close()
        assert modes['db1'] == 'transaction'
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------- the Odoo image's install

def test_pip_installed_package_loads_in_odoo_without_addons_path(pg, tmp_path):
    """What docker/Dockerfile does: pip install the repository (--no-deps) next to Odoo; Odoo
    then loads db_pooling server-wide from site-packages (odoo.addons namespace), with no
    addons_path entry and without the repository on the path."""
    from odoo_pool_patch.devtools.odoo_runner import OdooServer, available_trees
    trees = [tree for tree in available_trees()[0] if tree.major == 18]   # the image's series
    if not trees:
        pytest.skip('no Odoo 18 tree found (ODOO_PATH or /opt/odoo/18.0)')
    tree = trees[0]
    site = tmp_path / 'site-packages'
    ok(subprocess.run([tree.python, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                       str(site), ROOT], capture_output=True, text=True, timeout=600))
    server = OdooServer(tree, pg, str(tmp_path), options={
        'addons_path': os.path.join(tree.path, 'odoo', 'addons')})
    assert ROOT not in server.options['addons_path']
    server.write_config()
    server.proc = subprocess.Popen(
        tree.command() + ['-c', server.conffile], cwd=tree.path, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join((str(site), tree.path))),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server.wait_http()
        assert wait_for(lambda: 'db_pooling active in process' in server.log()), \
            server.log_tail()
        assert 'not loaded server-wide' not in server.log()
    finally:
        server.stop()


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# ---------------------------------------------------------------- compose files

def read_env(name):
    values = {}
    with open(os.path.join(DOCKER, name)) as handle:
        for line in handle:
            if line.strip() and not line.lstrip().startswith('#'):
                key, _, value = line.strip().partition('=')
                values[key] = value
    return values


def load_compose(name):
    with open(os.path.join(ROOT, name)) as handle:
        return yaml.safe_load(handle)


def compose_stack():
    """docker-compose.yml with docker-compose.tls.yml's services beside it (not merged)."""
    return load_compose('docker-compose.yml'), load_compose('docker-compose.tls.yml')


def bind_mounts(service):
    """[(host path relative to the repository, container path)] of a service's bind mounts."""
    mounts = []
    for volume in service.get('volumes', []):
        source, target = volume.split(':')[:2]
        if source.startswith('./'):
            mounts.append((source[2:], target))
    return mounts


def host_path(service, container_path):
    """The repository file a container path of ``service`` comes from (through a bind mount)."""
    for source, target in bind_mounts(service):
        if container_path == target:
            return os.path.join(ROOT, source)
        if container_path.startswith(target.rstrip('/') + '/'):
            return os.path.join(ROOT, source, os.path.relpath(container_path, target))
    return None


def odoo_confs(compose, tls_override):
    """{service: repository path of the odoo.conf it mounts} for every Odoo service."""
    confs = {}
    for services in (compose['services'], tls_override['services']):
        for name, service in services.items():
            path = host_path(service, '/etc/odoo/odoo.conf')
            if path:
                confs[f'{name} ({os.path.basename(path)})'] = path
    return confs


def read_conf(path):
    """Odoo's options ([options]) and db_pooling's ([db_pooling], where they belong) of an
    odoo.conf, as one dict."""
    from odoo_pool_patch.config.conf_file import NAMES, SECTION
    parser = configparser.ConfigParser(inline_comment_prefixes=None)
    parser.read(path)
    ours, odoo = dict(parser[SECTION]), dict(parser['options'])
    assert set(ours) <= set(NAMES) and not set(odoo) & set(NAMES), path
    return {**odoo, **ours}


def test_compose_services_volumes_and_files_exist():
    compose, tls_override = compose_stack()
    services = compose['services']
    assert {'db', 'db-replica', 'odoo', 'pgbouncer', 'odoo-pgbouncer'} <= set(services)
    assert set(tls_override['services']) <= set(services)
    declared_volumes = set(compose['volumes'])
    for name, service in services.items():
        for volume in service.get('volumes', []):
            source = volume.split(':')[0]
            if source.startswith('./'):
                assert os.path.exists(os.path.join(ROOT, source)), (name, volume)
            else:
                assert source in declared_volumes, (name, volume)
        for env_file in [service['env_file']] if 'env_file' in service else []:
            assert os.path.isfile(os.path.join(ROOT, env_file)), (name, env_file)
        for dependency, condition in service.get('depends_on', {}).items():
            assert dependency in services, (name, dependency)
            assert condition == {'condition': 'service_healthy'}, (name, dependency)
            assert 'healthcheck' in services[dependency], dependency
            # a service of a profile may only be needed by services of that profile
            assert set(services[dependency].get('profiles', [])) <= set(service.get('profiles', []))
        assert 'healthcheck' in service, name
        if 'build' in service:
            context = os.path.join(ROOT, service['build']['context'])
            dockerfile = os.path.join(context, service['build'].get('dockerfile', 'Dockerfile'))
            with open(dockerfile) as handle:
                for line in handle:
                    if line.startswith('COPY '):
                        for source in shlex.split(line)[1:-1]:
                            assert os.path.exists(os.path.join(context, source)), (name, line)
        for command in (service.get('entrypoint') or [])[:1]:
            script = host_path(service, command)
            assert script and os.access(script, os.X_OK), (name, command)
    # the TLS override mounts what make-certs.sh writes into docker/certs
    with open(os.path.join(DOCKER, 'make-certs.sh')) as handle:
        assert '$(dirname "$0")/certs' in handle.read()
    for name, service in tls_override['services'].items():
        for source, target in bind_mounts(service):
            if source.startswith('docker/certs'):
                assert source in ('docker/certs', 'docker/certs/ca.crt'), (name, source)
            else:
                assert os.path.exists(os.path.join(ROOT, source)), (name, source)


def test_compose_publishes_only_odoo_on_the_loopback():
    compose, _ = compose_stack()
    published = {name: service['ports'] for name, service in compose['services'].items()
                 if 'ports' in service}
    assert set(published) == {'odoo', 'odoo-pgbouncer'}
    for ports in published.values():
        assert all(port.startswith('127.0.0.1:') and port.endswith(':8069') for port in ports)


def test_primary_runs_the_init_script_and_replica_the_bootstrap():
    compose, _ = compose_stack()
    db, replica = compose['services']['db'], compose['services']['db-replica']
    init = host_path(db, '/docker-entrypoint-initdb.d/10-replication.sh')
    assert init == os.path.join(ROOT, 'docker/postgres/primary-init.sh')
    assert os.access(init, os.X_OK)
    entrypoint = host_path(replica, replica['entrypoint'][0])
    with open(entrypoint) as handle:
        text = handle.read()
    assert 'replica-bootstrap.sh' in text and 'install-server-tls.sh' in text
    for name in ('replica-bootstrap.sh', 'install-server-tls.sh'):
        assert os.access(os.path.join(os.path.dirname(entrypoint), name), os.X_OK)
    assert replica['environment']['PG_ROLE'] == 'replica'
    assert replica['environment']['PRIMARY_HOST'] in compose['services']
    env = read_env(db['env_file'].replace('docker/', ''))
    assert env['REPLICATION_SLOT'] in env['REPLICATION_SLOTS'].split()


def test_odoo_confs_use_known_options_services_and_passwords():
    from odoo_pool_patch.config.options import load_settings
    compose, tls_override = compose_stack()
    services = compose['services']
    known = set(STOCK_OPTIONS_NAMES) | set(OPTION_NAMES) | set(TLS_NAMES)
    password = read_env('postgres.env')['POSTGRES_PASSWORD']
    with open(os.path.join(DOCKER, 'pgbouncer', 'userlist.txt')) as handle:
        assert f'"odoo" "{password}"' in handle.read()
    confs = odoo_confs(compose, tls_override)
    assert len(confs) == 3
    for where, path in confs.items():
        conf = read_conf(path)
        unknown = {name for name in conf if name.startswith('db_')} - known
        assert not unknown, f'{where}: not Odoo options nor ours: {sorted(unknown)}'
        assert 'db_pooling' in conf['server_wide_modules'].split(',')
        assert conf['db_password'] == password and conf['db_user'] == read_env(
            'postgres.env')['POSTGRES_USER']
        load_settings(conf.get, source=where)         # our values are valid
        for option in ('db_host', 'db_direct_host'):
            if option in conf:
                assert conf[option] in services, (where, option)
        for replica in conf.get('db_replicas', '').split(','):
            if replica:
                assert replica.split(':')[0] in services, (where, replica)
    with open(os.path.join(DOCKER, 'pgbouncer', 'pgbouncer.ini')) as handle:
        server = re.search(r'(?m)^\* = host=(\S+) port=(\d+)$', handle.read())
    assert server.group(1) in services


def compose_command():
    if shutil.which('docker-compose'):
        return ['docker-compose']
    if shutil.which('docker') and subprocess.run(['docker', 'compose', 'version'],
                                                 capture_output=True).returncode == 0:
        return ['docker', 'compose']
    return None


@pytest.mark.skipif(not compose_command(), reason='neither docker compose nor docker-compose '
                    'installed (apt-get install docker-compose validates without an engine)')
def test_compose_validates_the_stack_and_its_variants():
    for extra in ([], ['--profile', 'pgbouncer'],
                  ['-f', 'docker-compose.yml', '-f', 'docker-compose.tls.yml']):
        out = subprocess.run(compose_command() + extra + ['config', '-q'], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0, (extra, out.stderr)


@pytest.mark.skipif(not shutil.which('shellcheck'), reason='shellcheck not installed')
def test_scripts_pass_shellcheck():
    scripts = [os.path.join(base, name) for base, _, names in os.walk(DOCKER)
               for name in names if name.endswith('.sh')]
    assert len(scripts) == 5
    out = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


STOCK_OPTIONS_NAMES = tuple(option.name for option in STOCK_OPTIONS)
TLS_NAMES = tuple(n for prefix in ('db_', 'db_replica_')
                  for n in [prefix + 'sslmode'] + [prefix + s for s in tls.KEYWORDS])
