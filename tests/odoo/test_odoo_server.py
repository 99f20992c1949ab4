"""db_pooling inside real Odoo servers (16.0-19.0, every tree found; skipped without Odoo)."""
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from odoo_pool_patch.devtools.odoo_runner import OdooServer

from testkit import ROOT, requires_odoo

pytestmark = requires_odoo
ENGINE = 'odoo_pool_patch.pool.connection_pool.ConnectionPool'
METRICS_TOKEN = 'metrics-token-for-tests-0123456789'
ADDON_TESTS = os.path.join(ROOT, 'addons', 'db_pooling', 'tests')


@pytest.fixture(scope='module')
def server(odoo_tree, pg, tmp_path_factory):
    """A prefork server (4 HTTP workers, 1 cron worker) with db_pooling server-wide and one
    database ``dbp_<series>`` created through the database manager, db_pooling installed in it
    (for the dashboard's menu and assets)."""
    workdir = str(tmp_path_factory.mktemp(f'odoo{odoo_tree.major}'))
    os.chmod(workdir, 0o755)
    srv = OdooServer(odoo_tree, pg, workdir, options={
        'workers': 4, 'db_pool_metrics_token': METRICS_TOKEN,
        'db_pool_shared_path': os.path.join(workdir, 'shared-state')})
    srv.db = f'dbp_{odoo_tree.major}'
    srv.start()
    try:
        status, body = srv.post_form('/web/database/create', {
            'master_pwd': 'master-test', 'name': srv.db, 'lang': 'en_US', 'password': 'admin',
            'login': 'admin', 'country_code': '', 'phone': ''})
        assert 'error' not in body.lower()[:2000] or srv.db in list_dbs(srv), body[:2000]
        assert srv.db in list_dbs(srv), srv.log_tail()
        uid = srv.login(srv.db)
        module = srv.execute(srv.db, uid, 'admin', 'ir.module.module', 'search',
                             [['name', '=', 'db_pooling']])
        srv.execute(srv.db, uid, 'admin', 'ir.module.module', 'button_immediate_install', module)
        yield srv
    finally:
        srv.stop()


def test_installing_the_module_finds_its_python_distribution(server):
    """The fixture installed db_pooling in a database: Odoo found the distribution the manifest
    names (odoo_runner puts its metadata on the path), no "not a valid PyPI package" fallback."""
    uid = server.login(server.db)
    assert server.execute(server.db, uid, 'admin', 'ir.module.module', 'search_count',
                          [['name', '=', 'db_pooling'], ['state', '=', 'installed']]) == 1
    assert 'does not appear' not in server.log()


def list_dbs(srv):
    return srv.jsonrpc('db', 'list')


def duplicate(srv, name, new_name):
    # The db service rather than the /web/database/duplicate form: that form closes the
    # request's cursor when the request's (mono)db is the one duplicated, and stock Odoo 18
    # then answers 500 on a cold cache whichever pool is in use.
    srv.jsonrpc('db', 'duplicate_database', 'master-test', name, new_name)


def instance_connections(srv, pg):
    """This server's client backends (master, workers, gevent): [(pid, datname, app, state)]."""
    pids = {srv.proc.pid}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as handle:
                    stat = handle.read()
            except OSError:
                continue
            if int(stat[stat.rindex(')') + 2:].split()[1]) == srv.proc.pid:
                pids.add(int(entry))
    return [row for row in pg.connections('odoo-%') if app_pid(row[2]) in pids]


def app_pid(name):
    """The pid in our application_name odoo-<role>-<pid> (stock: odoo-<pid>), or None."""
    match = re.fullmatch(r'odoo-(?:[a-z]+-)?(\d+)', name)
    return int(match.group(1)) if match else None


def http_worker_pids(srv):
    return set(int(pid) for pid in re.findall(r'WorkerHTTP \((\d+)\) alive', srv.log()))


def test_database_manager_duplicate_and_drop(server, pg):
    copy = server.db + '_copy'
    duplicate(server, server.db, copy)
    assert copy in list_dbs(server), server.log_tail()
    uid = server.login(copy)
    assert server.execute(copy, uid, 'admin', 'res.users', 'search_count', []) >= 1
    server.post_form('/web/database/drop', {'master_pwd': 'master-test', 'name': copy})
    assert copy not in list_dbs(server), server.log_tail()
    assert not pg.sql('SELECT 1 FROM pg_database WHERE datname = %s', [copy])


def test_every_worker_uses_our_pool_under_jsonrpc_load(server, pg):
    databases = [server.db]
    for suffix in ('b', 'c'):
        name = f'{server.db}_{suffix}'
        if name not in list_dbs(server):
            duplicate(server, server.db, name)
        databases.append(name)
    assert set(databases) <= set(list_dbs(server))
    sessions = {db: server.session(db) for db in databases}
    uids = {db: server.login(db) for db in databases}

    def work(number):
        db = databases[number % len(databases)]
        tag = uuid.uuid4().hex[:8]
        partner = server.execute(db, uids[db], 'admin', 'res.partner', 'create',
                                 {'name': f'pool {tag}'})
        found = server.execute(db, uids[db], 'admin', 'res.partner', 'search_read',
                               [['name', '=', f'pool {tag}']], fields=['id'])
        assert [row['id'] for row in found] == [partner]
        return sessions[db].call('/db_pooling/pool_info')

    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        infos = list(executor.map(work, range(160)))
    workers = http_worker_pids(server)
    assert len(workers) == 4
    seen = {info['pid'] for info in infos}
    assert seen == workers, f'pool_info answered from {seen}, HTTP workers are {workers}'
    for info in infos:
        assert info['active'] and info['pool_class'] == ENGINE
        assert info['pools']['_Pool']['class'] == ENGINE
    # db_pool_reset = smart (default): Odoo's clean cursors reuse connections without a reset.
    assert max(info['pools']['_Pool']['stats']['reset_skipped'] for info in infos) > 0
    # Our pool names this process's connections in pg_stat_activity.
    assert pg.count_connections('odoo-%') >= 1


def test_prometheus_metrics_need_the_token_and_parse(server):
    prometheus = pytest.importorskip('prometheus_client.parser')
    assert server.metrics()[0] == 401
    assert server.metrics('wrong-token-wrong-token')[0] == 403
    status, text = server.metrics(METRICS_TOKEN)
    assert status == 200, text
    values = {}
    for family in prometheus.text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[('odoo_db_pool_budget', ())] == 4 + 3 * 1 + 1
    assert values[('odoo_db_pool_processes', (('role', 'http'),))] == 4
    assert values[('odoo_db_pool_processes', (('role', 'cron'),))] == 1
    assert values[('odoo_db_pool_borrows_total', (('role', 'http'),))] > 0
    # Instance-wide: the same figures whichever worker answers; counters only grow.
    _, again = server.metrics(METRICS_TOKEN)
    later = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in prometheus.text_string_to_metric_families(again) for s in f.samples}
    for key, value in values.items():
        if key[0].endswith('_total'):
            assert later[key] >= value


@contextlib.contextmanager
def held_connections(srv, count, database):
    """This test process joins the server's shared state (role 'other') and holds ``count``
    connections to ``database``, borrowed in a function the dashboard must name."""
    from odoo_pool_patch.shared import shared_state as ss
    from odoo_pool_patch.shared.budget import SharedBudget
    from odoo_pool_patch.pool.connection_pool import ConnectionPool
    state = ss.SharedState(srv.options['db_pool_shared_path'], create=False)
    budget = SharedBudget(state, state.cells[ss.H_BUDGET], role='other')
    pool = ConnectionPool(count, budget=budget, timer_period=0.1)
    info = {'database': database, 'host': srv.cluster.host, 'port': srv.cluster.port,
            'user': 'odoo', 'application_name': f'odoo-other-{os.getpid()}'}

    def borrowed_for_the_dashboard_test():
        return pool.borrow(info)
    held = [borrowed_for_the_dashboard_test() for _ in range(count)]
    try:
        time.sleep(0.5)                         # a maintenance tick publishes them
        yield held
    finally:
        for cnx in held:
            pool.give_back(cnx)
        time.sleep(0.5)                         # a tick publishes "nothing borrowed"
        pool.shutdown()


def test_dashboard_data_shows_a_known_state(server, pg):
    session = server.session(server.db)
    with held_connections(server, 2, server.db):
        data = session.call('/db_pooling/dashboard_data')
    assert data['active'] and data['server_wide'] and data['shared'] and not data['errors']
    workers = {row['pid']: row for row in data['workers']}
    me = workers[os.getpid()]
    assert (me['role'], me['in_use'], me['held']) == ('other', 2, 2)
    assert me['longest']['database'] == server.db
    assert me['longest']['site'].endswith('in borrowed_for_the_dashboard_test')
    http = {pid for pid, row in workers.items() if row['role'] == 'http'}
    assert http == http_worker_pids(server)
    assert [row['role'] for row in workers.values()].count('cron') == 1
    assert data['pid'] in http                  # served by one worker, shows them all
    assert data['totals']['budget'] == 4 + 3 * 1 + 1
    assert data['totals']['max_connections'] == int(pg.sql('SHOW max_connections')[0][0])
    rows = {(r['database'], r['application_name']): r for r in data['activity']}
    mine = rows[(server.db, f'odoo-other-{os.getpid()}')]
    assert mine['count'] == 2 and mine['ours']
    # application_name tells the role and the pid of each of the server's processes.
    for row in data['activity']:
        pid = app_pid(row['application_name'])
        if pid in workers and pid != os.getpid():
            assert row['ours']
            assert row['application_name'] == f"odoo-{workers[pid]['role']}-{pid}"
    assert any(app_pid(r['application_name']) in http for r in data['activity'])
    assert data['servers'][0]['kind'] == 'primary'
    assert data['servers'][0]['port'] == str(pg.port)
    assert data['settings']['db_pool_metrics_token'] == '(set)'
    assert METRICS_TOKEN not in json.dumps(data)


def test_odoo_pool_top_shows_the_running_odoo(server):
    out = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'top', '--once',
                          '-c', server.conffile], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f'budget {4 + 3 * 1 + 1}  held ')
    roles = re.findall(r'^ *(\d+) (\w+) ', out.stdout, re.M)
    assert {int(pid) for pid, role in roles if role == 'http'} == http_worker_pids(server)
    assert [role for _, role in roles].count('cron') == 1


@contextlib.contextmanager
def dashboard_page(srv, profile):
    """Headless Chromium showing the dashboard as the admin (skips without Chromium)."""
    from testkit.chromium_cdp import Chromium, find_chromium
    binary = find_chromium()
    if not binary:
        pytest.skip('chromium not found (Debian: apt-get install chromium): the dashboard '
                    'page is not checked in a browser')
    session = srv.session(srv.db)
    cookie = next(c.value for c in session.cookies if c.name == 'session_id')
    browser = Chromium(binary, str(profile), height=1250)
    try:
        browser.set_cookie(srv.url('/'), 'session_id', cookie)
        browser.navigate(srv.url('/odoo/action-db_pooling.action_dashboard'
                                 if srv.tree.major >= 18
                                 else '/web#action=db_pooling.action_dashboard'))
        held = "document.querySelector('[data-figure=held]')"
        assert browser.wait_for(f'{held} && {held}.textContent', timeout=120), browser.errors
        yield browser
    finally:
        browser.close()


@contextlib.contextmanager
def jsonrpc_load(srv, clients=4):
    """``clients`` threads reading partners over JSON-RPC until the block ends."""
    uid = srv.login(srv.db)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            srv.execute(srv.db, uid, 'admin', 'res.partner', 'search_read', [],
                        fields=['name'], limit=50)
    threads = [threading.Thread(target=load, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


@pytest.mark.browser
def test_dashboard_page_in_headless_chromium(server, pg, tmp_path):
    """The real page in a real browser: loads without JavaScript errors, shows the
    figures and follows a load without being reloaded. DB_POOLING_SCREENSHOT=<file>
    keeps the screenshot (docs/dashboard.png)."""
    with dashboard_page(server, tmp_path / 'profile') as browser:
        assert browser.evaluate("document.querySelector('[data-figure=budget]').textContent") \
            == str(4 + 3 * 1 + 1)
        assert browser.evaluate("document.querySelectorAll('.o_dbp_workers tbody tr').length") >= 7
        assert 'pooling active' in browser.evaluate("document.querySelector('.o_dbp_active').textContent")
        browser.evaluate('window.dbpNotReloaded = true')
        first = int(browser.evaluate("document.querySelector('.o_dbp_refreshes').textContent"))
        # The page follows by itself: this process's row shows its two borrows.
        mine = (f"(row => row && row.cells[2].textContent === '2' && row.textContent.includes("
                f"'borrowed_for_the_dashboard_test') && row.textContent)(document.querySelector("
                f"'.o_dbp_workers tr[data-pid=\"{os.getpid()}\"]'))")
        with jsonrpc_load(server), held_connections(server, 2, server.db):
            shown = browser.wait_for(mine, timeout=60)
            assert shown and server.db in shown, browser.errors
            assert browser.wait_for("document.querySelector('.o_dbp_refreshes').textContent"
                                    f" > {first + 1}", timeout=60)
            browser.screenshot(str(tmp_path / 'dashboard.png'))
        assert browser.evaluate('window.dbpNotReloaded') is True
        assert browser.evaluate("document.querySelectorAll('.o_dbp_error, .o_error_dialog').length") == 0
        assert browser.errors == []
    if os.environ.get('DB_POOLING_SCREENSHOT'):
        shutil.copy(tmp_path / 'dashboard.png', os.environ['DB_POOLING_SCREENSHOT'])


def test_gevent_process_installs_our_pool(server):
    log = server.log()
    master = re.search(r'(\d+) INFO \S+ odoo.service.server: HTTP service \(werkzeug\)', log)
    active = set(re.findall(r' (\d+) INFO \S+ odoo.sql_db.pool: db_pooling active in process', log))
    assert len(active) >= 2, log[-3000:]          # the master and the separate gevent process
    assert master is None or master.group(1) in active


def test_stock_db_cursor_tests_pass(server, odoo_tree, pg, tmp_path):
    """Odoo's own base/tests/test_db_cursor.py, run by Odoo's test runner with db_pooling
    server-wide (pytest-odoo cannot run it: test_connection_readonly fails there with the
    stock pool too, as pytest-odoo does not set up Odoo's test mode the same way)."""
    stock = os.path.join(odoo_tree.path, 'odoo', 'addons', 'base', 'tests', 'test_db_cursor.py')
    with open(stock) as handle:
        classes = re.findall(r'^class (\w+)\(', handle.read(), re.M)
    os.chmod(tmp_path, 0o755)
    # As on Odoo's own CI, the "replica" of 18+ test mode is the primary itself (without it,
    # 18's read-only pool connects to the default Unix socket, with the stock pool as well).
    runner = OdooServer(odoo_tree, pg, str(tmp_path), name='stocktests', options={
        'db_replica_host': pg.host, 'db_replica_port': pg.port})
    # A database of its own, created and installed by this run: updating base in the shared
    # server's database fails at random while that server's cron worker runs one of its jobs
    # (Odoo 19: "This cron task is currently being executed and may not be modified").
    dbname = f'stocktests_{odoo_tree.major}'
    try:
        proc = runner.run('-d', dbname, '-i', 'base', '--stop-after-init',
                          '--test-tags', ','.join(f'/base:{name}' for name in classes),
                          check=False, timeout=900)
    finally:
        server.post_form('/web/database/drop', {'master_pwd': 'master-test', 'name': dbname})
    log = runner.log()
    assert proc.returncode == 0, log[-5000:]
    assert 'db_pooling active in process' in log
    ran = re.findall(r'(\d+) failed, (\d+) error\(s\) of (\d+) tests', log)
    assert not re.search(r'ERROR .* (FAIL|ERROR): ', log), log[-5000:]
    assert ran and int(ran[-1][2]) >= 5 and ran[-1][:2] == ('0', '0'), log[-5000:]


def test_addon_tests_pass_in_odoo_with_pytest_odoo(server, odoo_tree, tmp_path):
    """Our in-Odoo tests (pool active, access rules of the JSON route), through pytest-odoo."""
    conf = server.write_config()
    proc = subprocess.run(
        [odoo_tree.python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         '-p', 'odoo_pool_patch.devtools.pytest_plugin',
         f'--odoo-config={conf}', f'--odoo-database={server.db}', '--odoo-http', ADDON_TESTS],
        env=odoo_tree.env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    failures = proc.stdout.find('= FAILURES =')
    assert proc.returncode == 0, (proc.stdout[failures:failures + 6000] if failures >= 0
                                  else proc.stdout[-3000:] + proc.stderr[-3000:])
    assert re.search(r'\b37 passed', proc.stdout), proc.stdout[-2000:]


def test_bad_option_stops_startup_with_clear_message(odoo_tree, pg, tmp_path):
    os.chmod(tmp_path, 0o755)
    srv = OdooServer(odoo_tree, pg, str(tmp_path), name='badopt',
                     options={'db_pool_wait_timeout': '-5', 'db_pool_idle_timeout': 'soon'})
    proc = srv.run('--stop-after-init', check=False, timeout=120)
    assert proc.returncode != 0
    for text in (proc.stdout, srv.log()):
        assert f"db_pool_wait_timeout = '-5' in {srv.conffile} [db_pooling]" in text
        assert f"db_pool_idle_timeout = 'soon' in {srv.conffile} [db_pooling]" in text
        assert 'a number of seconds >= 0' in text


def test_unusable_shared_state_path_stops_startup(odoo_tree, pg, tmp_path):
    os.chmod(tmp_path, 0o755)
    srv = OdooServer(odoo_tree, pg, str(tmp_path), name='badpath',
                     options={'db_pool_shared_path': '/nonexistent-dir/odoo-budget'})
    proc = srv.run('--stop-after-init', check=False, timeout=120)
    assert proc.returncode != 0
    assert 'cannot open its shared state file /nonexistent-dir/odoo-budget' in srv.log()
    assert 'set db_pool_shared_path to a writable absolute path' in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('runuser'),
                    reason='needs root and runuser to act as another local user')
@pytest.mark.parametrize('planted', ['symlink', 'file_0666'])
def test_a_state_file_planted_by_another_user_stops_startup(odoo_tree, pg, tmp_path, planted):
    """Another local user (nobody) plants a symbolic link to Odoo's own config, or a
    world-writable file, at the state path: Odoo refuses to start, says why, and the
    link's target is untouched."""
    os.chmod(tmp_path, 0o755)
    public = tempfile.mkdtemp(prefix='dbp-public-')
    try:
        os.chmod(public, 0o1777)
        path = os.path.join(public, 'state')
        srv = OdooServer(odoo_tree, pg, str(tmp_path), name='planted',
                         options={'db_pool_shared_path': path})
        conf = srv.write_config()
        before = open(conf).read()
        command = ['ln', '-s', conf, path] if planted == 'symlink' else \
            ['sh', '-c', f'umask 0; : > {path}; chmod 666 {path}']
        subprocess.run(['runuser', '-u', 'nobody', '--', *command], check=True, timeout=30)
        proc = srv.run('--stop-after-init', check=False, timeout=120)
        assert proc.returncode != 0
        why = 'it is a symbolic link' if planted == 'symlink' else 'it belongs to uid'
        for text in (proc.stdout, srv.log()):
            assert f'refusing the shared state file {path}: {why}' in text
        assert open(conf).read() == before
        if planted == 'file_0666':
            assert os.path.getsize(path) == 0
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_installed_without_server_wide_loading_warns(server, odoo_tree, pg, tmp_path):
    os.chmod(tmp_path, 0o755)
    srv = OdooServer(odoo_tree, pg, str(tmp_path), name='notserverwide', load_pooling=False)
    srv.run('-d', server.db, '-i', 'db_pooling', '--stop-after-init', timeout=300)
    assert 'not loaded server-wide, so connection pooling is NOT active' in srv.log()
    assert 'db_pooling active in process' not in srv.log()


def test_shared_budget_with_8_workers_on_6_databases(odoo_tree, pg, tmp_path):
    """Default settings, prefork 8 HTTP + 1 cron worker, 6 databases, 16 JSON-RPC clients:
    the instance never holds more than its budget (12) and goes back to rest after the load."""
    import threading
    import time
    os.chmod(tmp_path, 0o755)
    prefix = f'budget{odoo_tree.major}_'
    setup = OdooServer(odoo_tree, pg, str(tmp_path), name='budget-setup', load_pooling=False)
    setup.run('-d', prefix + '1', '-i', 'base', '--stop-after-init', timeout=600)
    databases = [prefix + str(n) for n in range(1, 7)]
    for name in databases[1:]:
        # Owned by odoo, as Odoo's own would be: Odoo lists only the databases its user owns,
        # and seeing one it would serve every sessionless request on it (monodb).
        pg.copy_database(name, databases[0], owner='odoo')
    srv = OdooServer(odoo_tree, pg, str(tmp_path), name='budget', options={
        'workers': 8, 'max_cron_threads': 1, 'db_pool_idle_timeout': 2,
        'dbfilter': f'^{prefix}.*$', 'db_pool_shared_path': str(tmp_path / 'budget-state')})
    srv.start()
    try:
        assert set(databases) <= set(srv.jsonrpc('db', 'list'))     # not monodb
        uids = {db: srv.login(db) for db in databases}
        errors, stop_at = [], time.time() + 12

        def client(number):
            rng = __import__('random').Random(number)
            while time.time() < stop_at:
                db = rng.choice(databases)
                try:
                    srv.execute(db, uids[db], 'admin', 'res.partner', 'search_read', [],
                                fields=['name'], limit=20)
                    if rng.random() < 0.2:
                        srv.execute(db, uids[db], 'admin', 'res.partner', 'create', {'name': 'b'})
                except Exception as exc:         # noqa: BLE001
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, len(instance_connections(srv, pg)))
            time.sleep(0.05)
        assert not errors, errors[:3]
        assert 6 <= peak <= 12, peak
        assert 'one budget of 12 server connections for the whole instance' in srv.log()
        # Workers took over each other's idle connections (db_pool_shared_idle) instead of
        # opening new ones for a database they held none of.
        from odoo_pool_patch.shared import shared_state as ss
        state = ss.SharedState(str(tmp_path / 'budget-state'), create=False)
        taken = sum(counters['taken'] for counters in state.counter_totals().values())
        state.close()
        assert taken > 0
        assert srv.metrics(METRICS_TOKEN)[0] == 404     # no token configured: off
        # At rest: min_idle (1) plus the long-lived LISTEN connections (postgres database).
        def at_rest():
            ordinary = [c for c in instance_connections(srv, pg) if c[1] != 'postgres']
            return len(ordinary) <= 1
        assert pg.wait_until(at_rest, timeout=2 + 1 + 3), instance_connections(srv, pg)
    finally:
        srv.stop()


def test_backup_and_restore_against_a_tls_only_server(odoo_tree, tmp_path, pki):
    """verify-full with a private CA and a client certificate, all from odoo.conf: Odoo's
    cursors and its pg_dump/psql for backup and restore all get through."""
    from odoo_pool_patch.devtools.embedded_pg import Cluster, find_bindir
    os.chmod(tmp_path, 0o755)
    cluster = Cluster('tls-odoo').init().start()
    try:
        cluster.create_role('odoo')
        cluster.enable_tls(pki, tls_only=True)
        srv = OdooServer(odoo_tree, cluster, str(tmp_path), name='tls', options={
            'db_host': 'localhost', 'db_sslmode': 'verify-full',
            'db_sslrootcert': pki.path('ca.crt'), 'db_sslcert': pki.path('client.crt'),
            'db_sslkey': pki.path('client.key'), 'pg_path': find_bindir()})
        srv.start()
        try:
            db = f'tls{odoo_tree.major}'
            srv.post_form('/web/database/create', {
                'master_pwd': 'master-test', 'name': db, 'lang': 'en_US', 'password': 'admin',
                'login': 'admin', 'country_code': '', 'phone': ''})
            assert db in list_dbs(srv), srv.log_tail()
            dump = srv.jsonrpc('db', 'dump', 'master-test', db, 'zip', timeout=300)
            srv.jsonrpc('db', 'restore', 'master-test', db + '_restored', dump, True, timeout=300)
            assert db + '_restored' in list_dbs(srv), srv.log_tail()
            uid = srv.login(db + '_restored')
            assert srv.execute(db + '_restored', uid, 'admin', 'res.users', 'search_count', []) >= 1
            # Every connection of ours is encrypted.
            rows = cluster.sql("SELECT a.application_name, s.ssl FROM pg_stat_activity a "
                               "JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'odoo-%'")
            assert rows and all(encrypted for _, encrypted in rows)
        finally:
            srv.stop()
    finally:
        cluster.destroy()


def test_sessionless_requests_reuse_the_database_list(server, pg):
    """Stock Odoo opens a connection to the postgres database for every request without
    a session database (to list the databases); db_pool_list_dbs_cache (default 2 s)
    keeps the list per process, so 40 JSON-RPC calls open only a few."""
    import time
    admin = pg.connect('postgres', application_name='dbpool-admin-sessions')

    def postgres_sessions():
        with admin.cursor() as cur:
            cur.execute('SELECT pg_stat_clear_snapshot()')
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'")
            return cur.fetchone()[0]
    try:
        before = postgres_sessions()
        started = time.monotonic()
        for _ in range(40):
            server.jsonrpc('common', 'version')
        windows = (time.monotonic() - started) / 2 + 1
        time.sleep(1.5)                 # backends report their sessions within a second
        opened = postgres_sessions() - before
    finally:
        admin.close()
    # At most one listing per worker per 2 s window, plus cron/gevent; stock: 40 or more.
    assert opened <= 4 * windows + 4 and opened < 40, (opened, windows)
def test_dashboard_says_what_failed_while_the_database_server_is_down(server, pg, tmp_path):
    """Runs last for its server: stops the session's PostgreSQL for a moment. The page keeps
    its last figures and says what failed; the JSON route answers again once it is back
    (to a new login: Odoo drops the database from a session it could not serve)."""
    with dashboard_page(server, tmp_path / 'profile') as browser:
        budget = browser.evaluate("document.querySelector('[data-figure=budget]').textContent")
        pg.stop()
        try:
            banner = browser.wait_for("document.querySelector('.o_dbp_error') && "
                                      "document.querySelector('.o_dbp_error').textContent",
                                      timeout=60)
            assert banner and 'Could not refresh at' in banner and 'figures below are from' in banner
            # Odoo cannot open the database, drops it from the session and serves the
            # request without it (404 or "Session expired"): the page says what that means.
            assert 'database server is probably down' in banner or 'log in again' in banner, banner
            assert browser.evaluate("document.querySelector('[data-figure=budget]').textContent") \
                == budget                       # the last figures stay on screen
        finally:
            pg.start()
        assert browser.errors == []
    data = server.session(server.db).call('/db_pooling/dashboard_data')
    assert not data['errors'] and data['servers'][0]['health'] == 'healthy'
