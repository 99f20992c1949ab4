"""A throw-away PgBouncer in front of an ``embedded_pg.Cluster``, for the benchmarks.

Runs ``/usr/sbin/pgbouncer`` (``$PGBOUNCER`` to override) in the foreground as
the ``postgres`` user (through ``runuser`` when we are root, like the
clusters), on a free loopback port, in transaction pooling mode by default,
trusting the users listed in its auth file. Every database of the cluster is
reachable through it (``* = host=... port=...``).
"""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from odoo_pool_patch.embedded_pg import SERVER_USER, free_port


class PgBouncerError(RuntimeError):
    pass


class PgBouncer:
    """:param settings: extra ``[pgbouncer]`` lines, ``{name: value}`` (e.g.
    ``default_pool_size``, ``server_idle_timeout``, ``max_user_connections``)."""

    def __init__(self, cluster, pool_mode='transaction', users=('odoo',), settings=None):
        self.binary = os.environ.get('PGBOUNCER') or shutil.which('pgbouncer') or '/usr/sbin/pgbouncer'
        if not os.path.exists(self.binary):
            raise PgBouncerError(f'PgBouncer not found at {self.binary}: install it '
                                 f'(apt-get install pgbouncer) or set PGBOUNCER to its path.')
        self.cluster = cluster
        self.host = '127.0.0.1'
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix='dbpool-pgbouncer-')
        self.logfile = os.path.join(self.base, 'pgbouncer.log')
        self.settings = {
            'listen_addr': self.host, 'listen_port': self.port,
            'unix_socket_dir': self.base, 'auth_type': 'trust',
            'auth_file': os.path.join(self.base, 'users.txt'),
            'pool_mode': pool_mode, 'max_client_conn': 2000,
            'logfile': self.logfile, 'admin_users': ','.join(users),
            'ignore_startup_parameters': 'extra_float_digits,options',
        }
        self.settings.update(settings or {})
        self.users = users
        self.proc = None

    def _write(self, name, text):
        path = os.path.join(self.base, name)
        with open(path, 'w') as handle:
            handle.write(text)
        return path

    def start(self, timeout=30):
        self._write('users.txt', ''.join(f'"{user}" ""\n' for user in self.users))
        conf = self._write('pgbouncer.ini', (
            '[databases]\n'
            f'* = host={self.cluster.host} port={self.cluster.port}\n'
            '[pgbouncer]\n' + ''.join(f'{k} = {v}\n' for k, v in self.settings.items())))
        command = [self.binary, conf]
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.base, conf, self.settings['auth_file']):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command = ['runuser', '-u', SERVER_USER, '--', *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PgBouncerError(f'pgbouncer exited with {self.proc.returncode}:\n{self.log_tail()}')
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise PgBouncerError(f'pgbouncer did not listen on {self.host}:{self.port} within '
                             f'{timeout} s:\n{self.log_tail()}')

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()       # runuser passes SIGTERM on to pgbouncer
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self.proc = None

    def destroy(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines=20):
        try:
            with open(self.logfile, errors='replace') as handle:
                return ''.join(handle.readlines()[-lines:])
        except OSError:
            return ''

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.destroy()
