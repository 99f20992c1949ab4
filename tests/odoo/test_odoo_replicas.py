"""Replica routing in real Odoo servers (a primary and two pg_basebackup replicas).

18/19: stock read-only routes and @api.readonly methods are served by the replicas, a
read-only route that writes is retried on the primary, and a session reads its own
writes. 16/17: the replica_cursor() API and db_replica_readonly_methods.
"""
import os
import threading
import time
import uuid

import pytest

from odoo_pool_patch.devtools.odoo_runner import OdooServer

from testkit import requires_odoo

pytestmark = requires_odoo
TEST_ADDONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'addons')


@pytest.fixture(scope='module')
def server(odoo_tree, pg, replica_set, tmp_path_factory):
    """A prefork server (2 HTTP workers) routing to both replicas, with one database."""
    workdir = str(tmp_path_factory.mktemp(f'odoo-replicas{odoo_tree.major}'))
    os.chmod(workdir, 0o755)
    first, second = replica_set
    options = {
        'workers': 2,
        'db_replicas': f'{first.host}:{first.port},{second.host}:{second.port}',
        'db_replica_ban_time': 2,
        'db_replica_readonly_methods': 'search_read,read,write',   # write: to prove the retry
        # Room in the budget: every read follows the weighted choice, so that a few reads
        # reach both replicas (with a full budget a worker keeps to the replica it holds a
        # connection to, see replicas.STICK; tested in test_replicas.py).
        'db_pool_max_connections': 20,
        'addons_path': odoo_tree.addons_path + ',' + TEST_ADDONS,
    }
    srv = OdooServer(odoo_tree, pg, workdir, options=options)
    srv.options['server_wide_modules'] += ',db_pooling_replica_test'
    srv.db = f'dbr_{odoo_tree.major}_{uuid.uuid4().hex[:6]}'
    srv.start()
    try:
        srv.jsonrpc('db', 'create_database', 'master-test', srv.db, False, 'en_US', 'admin')
        for replica in replica_set:     # the new database must have reached both replicas
            assert replica.wait_until(lambda: replica.sql(
                'SELECT 1 FROM pg_database WHERE datname = %s', [srv.db]), timeout=60)
        yield srv
    finally:
        srv.stop()


def ports_of(replica_set):
    return {replica.port for replica in replica_set}


def replayed_session(server, replica_set):
    """A logged-in session whose login (a write) both replicas have replayed: until then
    read-your-writes rightly sends its reads to the primary."""
    session = server.session(server.db)

    def replayed():
        # The first requests after a login write too (18+ logs the device): wait until the
        # session's position stays put and both replicas have it.
        first, status = session.call('/dbp_test/status'), session.call('/dbp_test/status')
        return first['lsn'] == status['lsn'] and all(
            row['replay_lsn'] >= (status['lsn'] or 0)
            for row in status['servers'] if row['kind'] == 'replica')
    assert replica_set[0].wait_until(replayed, timeout=30, interval=0.2)
    return session


def transactions(cluster, db):
    """Transactions (commits + rollbacks) the server has run in ``db``."""
    return cluster.sql('SELECT xact_commit + xact_rollback FROM pg_stat_database '
                       'WHERE datname = %s', [db])[0][0]


def assert_served_by_replicas(server, replica_set, session, calls, jsonrpc=False):
    """``calls`` search_read calls (call_kw, or /jsonrpc execute_kw) make every replica run
    more transactions."""
    time.sleep(1.5)     # let statistics of earlier transactions reach pg_stat_database
    before = [transactions(replica, server.db) for replica in replica_set]
    for _ in range(calls):
        if jsonrpc:
            server.execute(server.db, session.uid, 'admin', 'res.partner', 'search_read', [],
                           fields=['name'], limit=5)
        else:
            session.call('/web/dataset/call_kw/res.partner/search_read', model='res.partner',
                         method='search_read', args=[[]],
                         kwargs={'fields': ['name'], 'limit': 5})
    for replica, count in zip(replica_set, before):      # statistics are flushed within 1 s
        assert replica.wait_until(lambda: transactions(replica, server.db) > count, timeout=10)


def requires(tree, major_min=None, major_max=None):
    if major_min and tree.major < major_min or major_max and tree.major > major_max:
        pytest.skip(f'not for Odoo {tree.series}')


def test_readonly_routes_served_by_replicas(server, odoo_tree, pg, replica_set):
    requires(odoo_tree, major_min=18)
    session = replayed_session(server, replica_set)
    served = [tuple(session.call('/dbp_test/server')) for _ in range(30)]
    assert {port for port, _ in served} == ports_of(replica_set), (
        served, repr(session.call('/dbp_test/status')))
    assert all(in_recovery for _, in_recovery in served)
    # Stock @api.readonly methods through call_kw open their cursors on the replicas too.
    assert_served_by_replicas(server, replica_set, session, 20)


def test_write_on_readonly_route_is_retried_on_primary(server, odoo_tree, pg):
    requires(odoo_tree, major_min=18)
    session = server.session(server.db)
    value = uuid.uuid4().hex
    port, in_recovery = session.call('/dbp_test/write', value=value)
    assert (port, in_recovery) == (pg.port, False)
    stored = pg.sql("SELECT value FROM ir_config_parameter WHERE key = 'dbp_test.value'",
                    dbname=server.db)
    assert stored == [(value,)]


@pytest.fixture
def delayed_replicas(replica_set):
    """Both replicas replay WAL 1.5 s late."""
    for replica in replica_set:
        replica.sql("ALTER SYSTEM SET recovery_min_apply_delay = '1500ms'")
        replica.reload()
    yield
    for replica in replica_set:
        replica.sql('ALTER SYSTEM RESET recovery_min_apply_delay')
        replica.reload()


def test_session_reads_its_own_writes(server, odoo_tree, delayed_replicas):
    requires(odoo_tree, major_min=18)
    session = server.session(server.db)
    partner = session.call('/web/dataset/call_kw/res.partner/create', model='res.partner',
                           method='create', args=[{'name': 'v0'}], kwargs={})
    partner = partner[0] if isinstance(partner, list) else partner
    def pinned():
        return session.call('/dbp_test/status')['servers'][0]['fallbacks']['pinned']
    pinned_before, stale = pinned(), 0
    for trial in range(1, 16):
        session.call('/web/dataset/call_kw/res.partner/write', model='res.partner',
                     method='write', args=[[partner], {'name': f'v{trial}'}], kwargs={})
        read = session.call('/web/dataset/call_kw/res.partner/read', model='res.partner',
                            method='read', args=[[partner], ['name']], kwargs={})
        stale += read[0]['name'] != f'v{trial}'
    assert stale == 0
    # Those reads were kept off the (late) replicas by read-your-writes, not by chance.
    assert session.server.cluster.wait_until(lambda: pinned() - pinned_before >= 15, timeout=10)


def test_replica_cursor_api(server, odoo_tree, replica_set):
    session = replayed_session(server, replica_set)
    served = {tuple(session.call('/dbp_test/replica_cursor')) for _ in range(20)}
    assert {port for port, _ in served} == ports_of(replica_set), served
    assert all(in_recovery for _, in_recovery in served)


def test_readonly_methods_on_16_17(server, odoo_tree, pg, replica_set):
    requires(odoo_tree, major_max=17)
    session = replayed_session(server, replica_set)
    assert_served_by_replicas(server, replica_set, session, 20)
    assert_served_by_replicas(server, replica_set, session, 20, jsonrpc=True)
    # write is in the test's db_replica_readonly_methods: it fails on the replica and is
    # retried on the primary, where it lands.
    partner = session.call('/web/dataset/call_kw/res.partner/search', model='res.partner',
                           method='search', args=[[]], kwargs={'limit': 1})[0]
    session.call('/web/dataset/call_kw/res.partner/write', model='res.partner', method='write',
                 args=[[partner], {'name': 'written-on-primary'}], kwargs={})
    assert pg.sql('SELECT name FROM res_partner WHERE id = %s', [partner],
                  dbname=server.db) == [('written-on-primary',)]


def test_stopped_replica_no_request_fails(server, odoo_tree, pg, replica_set):
    """Stock 18/19 would stop using replicas for 20 minutes after one failure; here reads
    move to the other replica at once and come back after the ban (2 s, at most 4x)."""
    requires(odoo_tree, major_min=18)
    first, second = replica_set
    session = replayed_session(server, replica_set)
    first.stop()
    try:
        served = [session.call('/dbp_test/server')[0] for _ in range(20)]
        assert set(served) == {second.port}, served
    finally:
        first.start()
    assert first.wait_until(lambda: session.call('/dbp_test/server')[0] == first.port,
                            timeout=60, interval=0.1), server.log_tail()
    assert 'gets no reads for' in server.log()


def call_in_thread(session, path, **params):
    """Start ``session.call(path, **params)`` in a thread; a function that waits for it and
    returns its result (or raises what it raised)."""
    outcome = {}

    def run():
        try:
            outcome['result'] = session.call(path, **params)
        except Exception as exc:    # noqa: BLE001 - handed to the test
            outcome['error'] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join(60)
        assert not thread.is_alive(), f'{path} did not answer in 60 s'
        if 'error' in outcome:
            raise outcome['error']
        return outcome['result']
    return result


SLEEPING = ("SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
            "AND query LIKE %s AND pid <> pg_backend_pid()")


def test_request_killed_before_its_commit_runs_again(server, odoo_tree, pg):
    """A request that wrote and whose backend is terminated before its commit answers
    normally (run again on a new connection: request_retry) and its write is there once.
    Stock Odoo answers an error (InterfaceError: connection already closed)."""
    session = server.session(server.db)
    value = uuid.uuid4().hex
    result = call_in_thread(session, '/dbp_test/slow_write', value=value, seconds=2)
    killed = pg.wait_until(lambda: pg.sql(
        f'SELECT pg_terminate_backend(pid) FROM ({SLEEPING}) s', [server.db, '%pg_sleep(%'],
        dbname=server.db), timeout=30)
    assert killed, server.log_tail()
    assert result() == [pg.port, False]
    assert pg.sql("SELECT value FROM ir_config_parameter WHERE key = 'dbp_test.slow'",
                  dbname=server.db) == [(value,)]
    assert 'running it again on a new connection (retry 1 of 2)' in server.log()


def test_replica_stopped_mid_request_is_not_seen(server, odoo_tree, pg, replica_set):
    """A read-only request running on a replica that stops is run again elsewhere."""
    requires(odoo_tree, major_min=18)
    session = replayed_session(server, replica_set)
    result = call_in_thread(session, '/dbp_test/slow_server', seconds=2)
    running = {}

    def find():
        for replica in replica_set:
            if replica.sql(SLEEPING, [server.db, '%pg_sleep(%']):
                running['replica'] = replica
                return True
        return False
    assert pg.wait_until(find, timeout=30), server.log_tail()
    stopped = running['replica']
    stopped.stop()
    try:
        port, _ = result()
        assert port != stopped.port
    finally:
        stopped.start()
    assert stopped.wait_until(lambda: session.call('/dbp_test/server')[0] == stopped.port,
                              timeout=60, interval=0.1), server.log_tail()


def test_requests_run_under_deferred_parking(server, odoo_tree):
    """Every series: a request's cursors share a connection before another worker gets
    it (the behaviour itself: tests/processes/test_parking.py)."""
    assert server.session(server.db).call('/dbp_test/parking_deferred') is True
