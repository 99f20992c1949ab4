"""Find an Odoo source tree and run it as a real server, for the demo, tests and benchmarks.

Odoo is located through ``ODOO_PATH`` (a source tree: the directory holding
the ``odoo`` package) and run with ``ODOO_PYTHON`` (default: a venv next to
the tree, ``$ODOO_PATH-venv`` or ``$ODOO_PATH/.venv``, or this interpreter).
Nothing here imports Odoo: the server runs in its own interpreter.
"""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from ..config.conf_file import NAMES, SECTION
from .embedded_pg import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
ADDONS = os.path.join(REPO, 'addons')


class OdooNotFound(RuntimeError):
    pass


class OdooTree:
    """An Odoo source tree and the interpreter that runs it."""

    def __init__(self, path, python):
        self.path = os.path.abspath(path)
        self.python = python
        self.series = read_series(self.path)
        self.major = int(self.series.split('.')[0])

    @property
    def addons_path(self):
        paths = [os.path.join(self.path, 'odoo', 'addons'), os.path.join(self.path, 'addons')]
        return ','.join([p for p in paths if os.path.isdir(p)] + [ADDONS])

    def command(self):
        # A launcher script rather than "-m odoo": the prefork master re-runs
        # sys.argv[0] to start the gevent process.
        for launcher in ('odoo-bin', os.path.join('setup', 'odoo')):
            if os.path.exists(os.path.join(self.path, launcher)):
                return [self.python, os.path.join(self.path, launcher)]
        return [self.python, '-m', 'odoo']

    def env(self, extra=None):
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            p for p in (distribution_metadata(), REPO, self.path, env.get('PYTHONPATH')) if p)
        env.update(extra or {})
        return env

    def __repr__(self):
        return f'<Odoo {self.series} at {self.path}>'


DISTRIBUTION = 'odoo-pool-patch'      # pyproject.toml's name; the manifest's external dependency


def distribution_metadata():
    """A directory holding only this checkout's distribution metadata
    (``odoo_pool_patch-<version>.dist-info``), first on the ``PYTHONPATH`` of the Odoo servers
    run from here (before any stale ``*.egg-info`` a build left in the checkout): Odoo then
    finds the distribution the manifest's ``external_dependencies`` names, as after ``pip
    install``, while the code still comes from this checkout. It lives in the checkout
    (``build/``, ignored by git), so that no clone sees another's, and nothing is installed
    into Odoo's environment. None if it cannot be written: Odoo then imports
    ``odoo_pool_patch`` instead and logs that it is no distribution."""
    from .. import __version__
    root = os.path.join(REPO, 'build', 'odoo-path')
    dist = os.path.join(root, f'{DISTRIBUTION.replace("-", "_")}-{__version__}.dist-info')
    text = f'Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {__version__}\n'
    path = os.path.join(dist, 'METADATA')
    try:
        for directory in (os.path.dirname(root), root, dist):
            os.makedirs(directory, exist_ok=True)
            # Ours, and no symlink to elsewhere: what is removed or written below is in it.
            st = os.lstat(directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return None
        for entry in os.listdir(root):
            if entry.endswith('.dist-info') and os.path.join(root, entry) != dist:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)   # another version
        fd, temporary = tempfile.mkstemp(dir=dist, prefix='.METADATA')
        with os.fdopen(fd, 'w') as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)                     # whole, for a concurrent run
    except OSError:
        return None
    return root


def read_series(path):
    with open(os.path.join(path, 'odoo', 'release.py')) as handle:
        text = handle.read()
    match = re.search(r'version_info\s*=\s*\(\s*(?:[\'"]saas~)?(\d+)\s*,\s*(\d+)', text)
    if not match:
        raise OdooNotFound(f'{path}/odoo/release.py has no version_info')
    return f'{match.group(1)}.{match.group(2)}'


def find_odoo(path=None, python=None, use_env_python=True):
    """The Odoo tree named by ``path`` or ``ODOO_PATH``; raises OdooNotFound with the reason."""
    path = path or os.environ.get('ODOO_PATH')
    if not path:
        raise OdooNotFound('ODOO_PATH is not set (point it at an Odoo 16.0-19.0 source tree, '
                           'and ODOO_PYTHON at the interpreter of its virtualenv)')
    if not os.path.exists(os.path.join(path, 'odoo', 'release.py')):
        raise OdooNotFound(f'ODOO_PATH={path} is not an Odoo source tree (no odoo/release.py)')
    python = python or (os.environ.get('ODOO_PYTHON') if use_env_python else None)
    if not python:
        for candidate in (path.rstrip('/') + '-venv/bin/python', os.path.join(path, '.venv/bin/python'),
                          os.path.join(path, 'venv/bin/python')):
            if os.path.exists(candidate):
                python = candidate
                break
        else:
            python = sys.executable
    return OdooTree(path, python)


def _importable_odoo():
    """The tree of an ``odoo`` importable by this interpreter, if it is a real one."""
    import importlib.util
    try:
        spec = importlib.util.find_spec('odoo.release')
    except ImportError:
        return []
    if spec is None or not spec.origin:
        return []
    return [os.path.dirname(os.path.dirname(spec.origin))]


def available_trees():
    """Every Odoo tree to test against, and why there is none.

    ``ODOO_PATH`` may list several trees separated by ``:``; without it, an
    Odoo importable by this interpreter; without that, the trees laid out as ``$ODOO_TREES/<series>`` with ``<series>-venv`` beside
    them (default ``/opt/odoo``) are used.
    """
    paths = [p for p in os.environ.get('ODOO_PATH', '').split(':') if p]
    if not paths:
        paths = _importable_odoo()
    if not paths:
        root = os.environ.get('ODOO_TREES', '/opt/odoo')
        paths = [os.path.join(root, s) for s in ('16.0', '17.0', '18.0', '19.0')
                 if os.path.exists(os.path.join(root, s, 'odoo', 'release.py'))]
    if not paths:
        return [], ('no Odoo source tree: set ODOO_PATH to an Odoo 16.0-19.0 tree (and ODOO_PYTHON '
                    'to its interpreter), or lay trees out as /opt/odoo/<series> with '
                    '/opt/odoo/<series>-venv')
    return [find_odoo(path, use_env_python=len(paths) == 1) for path in paths], ''


def conf_text(options, pooling_section=SECTION, sections=None):
    """An odoo.conf: db_pooling's options of ``options`` in ``pooling_section``, the others
    in ``[options]``, then ``sections`` (``{name: {key: value}}``) as they are."""
    parts = {'options': {}, pooling_section: {}}
    for key, value in options.items():
        parts[pooling_section if key in NAMES else 'options'][key] = value
    for name, values in (sections or {}).items():
        parts.setdefault(name, {}).update(values)
    return ''.join(f'[{name}]\n' + ''.join(f'{key} = {value}\n' for key, value in values.items())
                   for name, values in parts.items() if values or name == 'options')


class OdooServer:
    """A real Odoo server process on a free port, with our addon on its addons path.

    :param options: extra odoo.conf entries: db_pooling's own go in ``[db_pooling]``,
        Odoo's in ``[options]``.
    :param pooling_section: ``'options'`` writes db_pooling's options in ``[options]``
        too, their old place.
    :param sections: more sections, ``{name: {key: value}}``, written as they are.
    """

    def __init__(self, tree, cluster, workdir, options=None, load_pooling=True, name='odoo',
                 pooling_section=SECTION, sections=None):
        self.tree = tree
        self.cluster = cluster
        self.workdir = workdir
        self.port = free_port()
        self.name = name
        self.logfile = os.path.join(workdir, f'{name}.log')
        self.conffile = os.path.join(workdir, f'{name}.conf')
        self.options = {
            'db_host': cluster.host, 'db_port': cluster.port, 'db_user': 'odoo',
            'db_password': 'False', 'addons_path': tree.addons_path,
            'data_dir': os.path.join(workdir, f'{name}-data'),
            'http_port': self.port, 'http_interface': '127.0.0.1', 'gevent_port': free_port(),
            'admin_passwd': 'master-test', 'list_db': 'True',
            'log_level': 'info', 'logfile': self.logfile,
            # 19 serves /jsonrpc from the rpc module, server-wide by default there
            'server_wide_modules': ','.join(
                (['base', 'rpc', 'web'] if tree.major >= 19 else ['base', 'web'])
                + (['db_pooling'] if load_pooling else [])),
            'max_cron_threads': 1,
        }
        if tree.major < 19:                 # 19 loads no demo data by default
            self.options['without_demo'] = 'all'
        if load_pooling:       # in the work directory: nothing left behind in /dev/shm
            self.options['db_pool_shared_path'] = os.path.join(workdir, f'{name}-shared-state')
        self.options.update(options or {})
        self.pooling_section = pooling_section
        self.sections = sections or {}
        self.proc = None

    def write_config(self):
        with open(self.conffile, 'w') as handle:
            handle.write(conf_text(self.options, self.pooling_section, self.sections))
        return self.conffile

    def run(self, *args, timeout=600, check=True):
        """Run Odoo once with this config (``--stop-after-init`` style); returns the process."""
        self.write_config()
        proc = subprocess.run(self.tree.command() + ['-c', self.conffile, *args],
                              env=self.tree.env(), cwd=self.tree.path, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if check and proc.returncode:
            raise RuntimeError(f'odoo {" ".join(args)} exited {proc.returncode}:\n'
                               f'{proc.stdout[-3000:]}\n{self.log_tail()}')
        return proc

    def start(self, *args, wait=True):
        self.write_config()
        self.proc = subprocess.Popen(self.tree.command() + ['-c', self.conffile, *args],
                                     env=self.tree.env(), cwd=self.tree.path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        if wait:
            self.wait_http()
        return self

    def wait_http(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'Odoo exited with {self.proc.returncode}:\n{self.log_tail()}')
            try:
                urllib.request.urlopen(self.url('/web/webclient/version_info'), data=b'{}', timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f'Odoo did not answer on port {self.port}:\n{self.log_tail()}')

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def url(self, path):
        return f'http://127.0.0.1:{self.port}{path}'

    def log_tail(self, lines=40):
        try:
            with open(self.logfile, errors='replace') as handle:
                return ''.join(handle.readlines()[-lines:])
        except OSError:
            return ''

    def log(self):
        try:
            with open(self.logfile, errors='replace') as handle:
                return handle.read()
        except OSError:
            return ''

    # ---------------------------------------------------------------- HTTP helpers
    def post_form(self, path, fields, timeout=300):
        data = urllib.parse.urlencode(fields).encode()
        with urllib.request.urlopen(self.url(path), data=data, timeout=timeout) as response:
            return response.status, response.read().decode(errors='replace')

    def metrics(self, token=None):
        """(HTTP status, text) of /db_pooling/metrics, with ``token`` as the bearer token."""
        request = urllib.request.Request(self.url('/db_pooling/metrics'))
        if token:
            request.add_header('Authorization', f'Bearer {token}')
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def jsonrpc(self, service, method, *args, timeout=120):
        return call_json(urllib.request.urlopen, self.url('/jsonrpc'),
                         {'service': service, 'method': method, 'args': list(args)}, timeout)

    def execute(self, db, uid, password, model, method, *args, **kwargs):
        return self.jsonrpc('object', 'execute_kw', db, uid, password, model, method,
                            list(args), kwargs)

    def session(self, db, login='admin', password='admin'):
        """A logged-in web session: ``call(path, **params)`` posts JSON-RPC with its cookie."""
        return WebSession(self, db, login, password)

    def login(self, db, login='admin', password='admin'):
        return self.jsonrpc('common', 'login', db, login, password)


class RpcError(Exception):
    def __init__(self, error):
        data = error.get('data') or {}
        super().__init__(data.get('message') or error.get('message'))
        self.error = error
        self.name = data.get('name', '')


class WebSession:
    def __init__(self, server, db, login, password):
        import http.cookiejar
        self.server = server
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.uid = self.call('/web/session/authenticate', db=db, login=login,
                             password=password)['uid']

    def call(self, path, timeout=120, **params):
        return call_json(self.opener.open, self.server.url(path), params, timeout)


def call_json(open_url, url, params, timeout):
    """POST one JSON-RPC call with ``open_url``; the result, or RpcError."""
    payload = {'jsonrpc': '2.0', 'method': 'call', 'id': 1, 'params': params}
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {'Content-Type': 'application/json'})
    with open_url(request, timeout=timeout) as response:
        body = json.loads(response.read())
    if 'error' in body:
        raise RpcError(body['error'])
    return body['result']
