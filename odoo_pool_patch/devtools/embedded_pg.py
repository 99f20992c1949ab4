"""Throw-away PostgreSQL clusters in temp directories, for the demo, tests and benchmarks.

A :class:`Cluster` runs ``initdb`` into a fresh temp directory, listens on a
free loopback port (and a Unix socket in its directory), trusts local
connections, and is removed by :meth:`Cluster.destroy`. PostgreSQL refuses to
run as root: when we are root the server runs as the ``postgres`` user through
``runuser``. Streaming replicas are made with ``pg_basebackup``.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg2

SERVER_USER = 'postgres'


class ClusterError(RuntimeError):
    pass


def find_bindir():
    """Directory of initdb/pg_ctl: $PG_BIN, the newest /usr/lib/postgresql/*/bin, or PATH."""
    candidates = [os.environ.get('PG_BIN')] if os.environ.get('PG_BIN') else []
    candidates += sorted(glob.glob('/usr/lib/postgresql/*/bin'),
                         key=lambda p: int(p.split('/')[-2]) if p.split('/')[-2].isdigit() else 0,
                         reverse=True)
    which = shutil.which('pg_ctl')
    if which:
        candidates.append(os.path.dirname(which))
    for path in candidates:
        if os.path.exists(os.path.join(path, 'initdb')):
            return path
    raise ClusterError('PostgreSQL server binaries (initdb, pg_ctl) not found: install them '
                       '(apt-get install postgresql) or set PG_BIN to their directory.')


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def file_tail(path, lines=20):
    """The last lines of a log file ('' when it cannot be read)."""
    try:
        with open(path) as handle:
            return ''.join(handle.readlines()[-lines:])
    except OSError:
        return ''


def as_server_user():
    return os.geteuid() == 0


class Cluster:
    """One PostgreSQL server in a temp directory.

    :param settings: extra ``postgresql.conf`` lines, ``{name: value}``.
    :param hba: extra ``pg_hba.conf`` lines, placed before the trust rules.
    """

    def __init__(self, name='pg', settings=None, hba=(), bindir=None, base_dir=None):
        self.name = name
        self.bindir = bindir or find_bindir()
        self.base = tempfile.mkdtemp(prefix=f'dbpool-{name}-', dir=base_dir)
        os.chmod(self.base, 0o755)
        self.datadir = os.path.join(self.base, 'data')
        self.sockdir = self.base
        self.logfile = os.path.join(self.base, 'server.log')
        self.port = free_port()
        self.host = '127.0.0.1'
        self.settings = dict(settings or {})
        self.hba = list(hba)
        self.superuser = SERVER_USER
        self._chown(self.base)

    # ---------------------------------------------------------------- processes
    def _chown(self, path):
        if as_server_user():
            pw = pwd.getpwnam(SERVER_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, *args, check=True, timeout=120):
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        if as_server_user():
            cmd = ['runuser', '-u', SERVER_USER, '--', *cmd]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, cwd=self.base)
        if check and proc.returncode:
            raise ClusterError(f'{self.name}: {" ".join(args[:2])} failed ({proc.returncode}):\n'
                               f'{proc.stdout}\n{self.log_tail()}')
        return proc

    def write_file(self, relpath, content, mode=0o600):
        path = os.path.join(self.base, relpath)
        with open(path, 'w') as handle:
            handle.write(content)
        os.chmod(path, mode)
        self._chown(path)
        return path

    def init(self):
        self._run('initdb', '-D', self.datadir, '-U', SERVER_USER, '-A', 'trust',
                  '-E', 'UTF8', '--locale=C', '--no-sync')
        self._configure()
        return self

    def _configure(self):
        conf = {
            'port': self.port,
            'listen_addresses': "'127.0.0.1'",
            'unix_socket_directories': f"'{self.sockdir}'",
            'fsync': 'off',
            'synchronous_commit': 'off',
            'shared_buffers': "'32MB'",
            'max_connections': 200,
            'wal_level': 'replica',
            'max_wal_senders': 10,
            'hot_standby': 'on',
            'hot_standby_feedback': 'on',
            'log_connections': 'off',
            'logging_collector': 'off',
        }
        conf.update(self.settings)
        with open(os.path.join(self.datadir, 'postgresql.auto.conf'), 'a') as handle:
            for name, value in conf.items():
                handle.write(f'{name} = {value}\n')
        hba = '\n'.join(self.hba + [
            'local all all trust',
            'local replication all trust',
            'host all all 127.0.0.1/32 trust',
            'host replication all 127.0.0.1/32 trust',
        ]) + '\n'
        with open(os.path.join(self.datadir, 'pg_hba.conf'), 'w') as handle:
            handle.write(hba)

    def start(self):
        self._run('pg_ctl', '-D', self.datadir, '-l', self.logfile, '-w', '-t', '60', 'start')
        return self

    def stop(self, mode='fast'):
        self._run('pg_ctl', '-D', self.datadir, '-m', mode, '-w', '-t', '60', 'stop', check=False)

    def restart(self, mode='fast'):
        self.stop(mode)
        self.start()

    def is_running(self):
        return self._run('pg_ctl', '-D', self.datadir, 'status', check=False).returncode == 0

    def reload(self):
        self._run('pg_ctl', '-D', self.datadir, 'reload')

    def destroy(self):
        if os.path.exists(os.path.join(self.datadir, 'postmaster.pid')):
            self.stop('immediate')
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines=20):
        return file_tail(self.logfile, lines)

    # ---------------------------------------------------------------- TLS
    def enable_tls(self, pki, tls_only=True):
        """Serve TLS with ``pki``'s server certificate; clients of role ``odoo`` must then
        present a certificate signed by ``pki``'s CA (``hostssl ... cert``). Restarts."""
        for name in ('server.crt', 'server.key', 'ca.crt'):
            with open(os.path.join(pki.directory, name), 'rb') as source:
                self.write_file(name, source.read().decode())
        self.settings.update({'ssl': 'on', 'ssl_cert_file': f"'{self.base}/server.crt'",
                              'ssl_key_file': f"'{self.base}/server.key'",
                              'ssl_ca_file': f"'{self.base}/ca.crt'"})
        self.hba = ['hostssl all odoo 127.0.0.1/32 cert',
                    'hostssl all all 127.0.0.1/32 trust'] + (
            ['hostnossl all all 127.0.0.1/32 reject'] if tls_only else []) + self.hba
        running = self.is_running()
        if running:
            self.stop()
        self._configure()
        if running:
            self.start()
        return self

    # ---------------------------------------------------------------- replicas
    def make_replica(self, name='replica', settings=None):
        """A streaming replica of this (running) cluster, made with pg_basebackup."""
        replica = Cluster(name, settings=settings, hba=self.hba, bindir=self.bindir)
        replica._run('pg_basebackup', '-D', replica.datadir, '-h', self.sockdir,
                     '-p', str(self.port), '-U', SERVER_USER, '-R', '-X', 'stream',
                     '--no-sync', '-c', 'fast')
        replica._configure()
        return replica.start()

    # ---------------------------------------------------------------- SQL helpers
    def dsn(self, dbname='postgres', user=None, **extra):
        info = {'host': self.host, 'port': self.port, 'dbname': dbname,
                'user': user or self.superuser}
        info.update(extra)
        return info

    def connect(self, dbname='postgres', user=None, autocommit=True, **extra):
        cnx = psycopg2.connect(**self.dsn(dbname, user, **extra))
        cnx.autocommit = autocommit
        return cnx

    def sql(self, query, params=None, dbname='postgres'):
        """Run one statement on a fresh admin connection; rows if it returns any."""
        cnx = self.connect(dbname, application_name='dbpool-admin')
        try:
            with cnx.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else None
        finally:
            cnx.close()

    def create_role(self, name, superuser=True):
        exists = self.sql('SELECT 1 FROM pg_roles WHERE rolname = %s', [name])
        if not exists:
            self.sql(f'CREATE ROLE "{name}" LOGIN {"SUPERUSER" if superuser else "CREATEDB"}')

    def create_database(self, name, owner=None):
        self.sql(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ''))

    def copy_database(self, name, template, owner=None, timeout=10.0):
        """CREATE DATABASE ``name`` from ``template`` once no session is on the template:
        PostgreSQL refuses to copy a database in use, and the backends of a client that
        just exited (an Odoo run with --stop-after-init) leave a moment after it."""
        if not self.wait_until(lambda: not self.count_connections(datname=template), timeout):
            raise ClusterError(f'{self.name}: database {template!r} still has sessions after '
                               f'{timeout:g} s ({self.connections(datname=template)}); '
                               f'cannot copy it to {name!r}')
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"' +
                 (f' OWNER "{owner}"' if owner else ''))

    def connections(self, application_name_like='%', datname=None):
        """Client backends from pg_stat_activity: [(pid, datname, application_name, state)]."""
        query = ("SELECT pid, datname, application_name, state FROM pg_stat_activity "
                 "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                 "AND application_name LIKE %s")
        params = [application_name_like]
        if datname:
            query += ' AND datname = %s'
            params.append(datname)
        return self.sql(query + ' ORDER BY pid', params)

    def count_connections(self, application_name_like='%', datname=None):
        return len(self.connections(application_name_like, datname))

    def terminate(self, application_name_like='%', datname=None):
        """pg_terminate_backend() on matching client backends; how many were terminated."""
        pids = [row[0] for row in self.connections(application_name_like, datname)]
        for pid in pids:
            self.sql('SELECT pg_terminate_backend(%s)', [pid])
        return len(pids)

    def wait_until(self, predicate, timeout=10.0, interval=0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        return predicate()

    def __repr__(self):
        return f'<Cluster {self.name} 127.0.0.1:{self.port} {self.base}>'


class ThrowawayPKI:
    """A throw-away CA with a server certificate for ``localhost`` and a client
    certificate for the database user ``odoo`` (openssl), plus an unrelated CA."""

    def __init__(self, directory, server_names=('localhost',)):
        self.directory = directory
        san = ','.join(f'DNS:{name}' for name in server_names)
        self._openssl('req', '-new', '-x509', '-days', '3', '-nodes', '-subj', '/CN=db_pooling test CA',
                      '-keyout', 'ca.key', '-out', 'ca.crt')
        self._openssl('req', '-new', '-x509', '-days', '3', '-nodes', '-subj', '/CN=some other CA',
                      '-keyout', 'other-ca.key', '-out', 'other-ca.crt')
        for name, subject, ext in (('server', '/CN=localhost', f'subjectAltName={san}'),
                                   ('client', '/CN=odoo', 'extendedKeyUsage=clientAuth')):
            self._openssl('req', '-new', '-nodes', '-subj', subject, '-keyout', f'{name}.key',
                          '-out', f'{name}.csr')
            with open(os.path.join(directory, f'{name}.ext'), 'w') as handle:
                handle.write(ext + '\n')
            self._openssl('x509', '-req', '-in', f'{name}.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
                          '-CAcreateserial', '-days', '3', '-out', f'{name}.crt',
                          '-extfile', f'{name}.ext')
        for name in os.listdir(directory):
            os.chmod(os.path.join(directory, name), 0o600 if name.endswith('.key') else 0o644)

    def _openssl(self, *args):
        proc = subprocess.run(['openssl', *args], cwd=self.directory, capture_output=True, text=True)
        if proc.returncode:
            raise ClusterError(f'openssl {args[0]} failed: {proc.stderr}')

    def path(self, name):
        return os.path.join(self.directory, name)
