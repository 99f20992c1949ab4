"""A throw-away PgBouncer in front of an :class:`~.embedded_pg.Cluster`, for tests and benchmarks.

Transaction mode by default (what breaks LISTEN, session advisory locks and
WITH HOLD cursors), trust authentication for the cluster's users, a free
loopback port, everything in a temp directory removed by :meth:`PgBouncer.destroy`.
Like PostgreSQL, it runs as the ``postgres`` user through ``runuser`` when we
are root.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

from .embedded_pg import SERVER_USER, ClusterError, as_server_user, file_tail, free_port

PGBOUNCER = '/usr/sbin/pgbouncer'


def find_pgbouncer():
    """Path of the pgbouncer binary, or None."""
    if os.path.exists(PGBOUNCER):
        return PGBOUNCER
    return shutil.which('pgbouncer')


class PgBouncer:
    """PgBouncer listening on 127.0.0.1:``port``, forwarding every database to ``cluster``.

    :param settings: extra or overriding ``[pgbouncer]`` lines, ``{name: value}``
        (e.g. ``server_idle_timeout``, ``max_user_connections``), for the benchmarks.
    """

    def __init__(self, cluster, pool_mode='transaction', users=('odoo', 'postgres'),
                 default_pool_size=20, settings=None):
        binary = os.environ.get('PGBOUNCER') or find_pgbouncer()
        if binary is None or not os.path.exists(binary):
            raise ClusterError('pgbouncer not found: install it (apt-get install pgbouncer) '
                               'or set PGBOUNCER to its path.')
        self.binary = binary
        self.cluster = cluster
        self.base = tempfile.mkdtemp(prefix='dbpool-pgbouncer-')
        os.chmod(self.base, 0o755)
        self.host = '127.0.0.1'
        self.port = free_port()
        self.logfile = os.path.join(self.base, 'pgbouncer.log')
        self.config = os.path.join(self.base, 'pgbouncer.ini')
        self.pool_mode = pool_mode
        with open(os.path.join(self.base, 'userlist.txt'), 'w') as handle:
            handle.writelines(f'"{user}" ""\n' for user in users)
        options = {
            'listen_addr': self.host, 'listen_port': self.port, 'unix_socket_dir': '',
            'auth_type': 'trust', 'auth_file': f'{self.base}/userlist.txt',
            'admin_users': 'postgres', 'pool_mode': pool_mode,
            'default_pool_size': default_pool_size, 'max_client_conn': 2000,
            'ignore_startup_parameters': 'extra_float_digits,options',
            'logfile': self.logfile, 'pidfile': f'{self.base}/pgbouncer.pid',
            **(settings or {}),
        }
        with open(self.config, 'w') as handle:
            handle.write(f'[databases]\n* = host={cluster.host} port={cluster.port}\n\n'
                         '[pgbouncer]\n' + ''.join(f'{k} = {v}\n' for k, v in options.items()))
        if as_server_user():
            import pwd
            pw = pwd.getpwnam(SERVER_USER)
            for path in (self.base, *(os.path.join(self.base, n) for n in os.listdir(self.base))):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self.process = None

    def start(self, timeout=20):
        cmd = [self.binary, self.config]
        if as_server_user():
            cmd = ['runuser', '-u', SERVER_USER, '--', *cmd]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=self.base)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClusterError(f'pgbouncer exited with {self.process.returncode}:\n'
                                   f'{self.log_tail()}')
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise ClusterError(f'pgbouncer did not listen on {self.port} within {timeout} s:\n'
                           f'{self.log_tail()}')

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()    # runuser passes SIGTERM on to pgbouncer
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def pid(self):
        """PgBouncer's process id (from its pidfile), None when it is not running."""
        try:
            with open(os.path.join(self.base, 'pgbouncer.pid')) as handle:
                return int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def destroy(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines=20):
        return file_tail(self.logfile, lines)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.destroy()

    def __repr__(self):
        return f'<PgBouncer {self.pool_mode} 127.0.0.1:{self.port} -> {self.cluster!r}>'
