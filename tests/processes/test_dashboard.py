"""The dashboard's data (odoo_pool_patch.observability.dashboard) from real processes and a real server."""
import os
import time

import psycopg2
import pytest

from odoo_pool_patch.observability import dashboard
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit.forks import collect, fork



@pytest.fixture
def state(tmp_path):
    state = ss.SharedState(str(tmp_path / 'segment'))
    yield state
    state.close()


def hold_in_a_child(path, info, hold_seconds):
    """Child process: borrow db2 and db3 from a recognisable function, hold them."""
    budget = SharedBudget(ss.SharedState(path), 6, role='cron')
    pool = ConnectionPool(4, budget=budget, timer_period=0.1)

    def report_job_holding_a_cursor():
        return pool.borrow(info('db2'))
    first = report_job_holding_a_cursor()
    time.sleep(0.2)
    second = pool.borrow(info('db3'))
    time.sleep(hold_seconds)
    pool.give_back(second)
    pool.give_back(first)
    time.sleep(0.5)                 # a tick publishes "nothing borrowed"
    pool.shutdown()
    return os.getpid()


def test_longest_borrow_of_another_process_comes_from_the_shared_state(state, info):
    pid, pipe = fork(hold_in_a_child, state.path, info, 4)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {row['pid']: row for row in dashboard.shared_figures(state)['workers']}
            if rows.get(pid, {}).get('longest') and rows[pid]['in_use'] == 2:
                break
            time.sleep(0.1)
        row = rows[pid]
        assert row['role'] == 'cron' and row['held'] == 2
        longest = row['longest']
        assert longest['database'] == 'db2'          # the older of the two borrows
        assert longest['site'].endswith('in report_job_holding_a_cursor')
        assert 'test_dashboard.py:' in longest['site']
        assert 0 <= longest['age'] < 60
    finally:
        assert collect(pid, pipe) == pid
    rows = {row['pid']: row for row in dashboard.shared_figures(state)['workers']}
    assert pid not in rows                          # dead processes are not shown


def test_detail_row_of_a_dead_process_is_not_shown_to_its_successor(state):
    state.publish_longest_borrow(3, 4242, 1_000, 'db1', 'x.py:1 in f')
    assert state.longest_borrow(3, 4242)['database'] == 'db1'
    assert state.longest_borrow(3, 4343) is None     # another process in that row
    long_site = '/very/long/path/' * 20 + 'module.py:12 in method'
    state.publish_longest_borrow(3, 4242, 2_000, 'é' * 40, long_site)
    shown = state.longest_borrow(3, 4242)
    assert shown['site'].endswith('module.py:12 in method') and len(shown['site']) <= 136
    assert shown['database'].startswith('éé') and '\ufffd' not in shown['database']
    state.publish_longest_borrow(3, 4242)
    assert state.longest_borrow(3, 4242) is None


def test_activity_marks_our_connections_by_application_name(pg, state):
    ours = psycopg2.connect(host=pg.host, port=pg.port, user='odoo', dbname='db3',
                            application_name=f'odoo-http-{os.getpid()}')
    theirs = psycopg2.connect(host=pg.host, port=pg.port, user='odoo', dbname='db3',
                              application_name='reporting-tool')
    probe = psycopg2.connect(host=pg.host, port=pg.port, user='odoo', dbname='postgres')
    try:
        with probe.cursor() as cur:
            data = dashboard.collect(dashboard.shared_figures(state),
                                     {'host': pg.host, 'port': pg.port}, cur, {}, True)
    finally:
        for cnx in (ours, theirs, probe):
            cnx.close()
    assert not data['errors']
    assert data['totals']['max_connections'] > 0
    rows = {(r['database'], r['application_name']): r for r in data['activity']}
    assert rows[('db3', f'odoo-http-{os.getpid()}')]['ours']
    assert not rows[('db3', 'reporting-tool')]['ours']
    db3 = next(entry for entry in data['databases'] if entry['database'] == 'db3')
    assert db3['ours'] >= 1 and db3['others'] >= 1
    primary = data['servers'][0]
    assert primary['kind'] == 'primary' and primary['health'] == 'healthy'
    assert primary['port'] == str(pg.port) and primary['connections'] >= 1


def test_database_server_down_is_reported_and_the_rest_still_served(state):
    from odoo_pool_patch.devtools.embedded_pg import free_port
    port = free_port()

    def activity(our_pids):
        with psycopg2.connect(host='127.0.0.1', port=port, user='odoo', dbname='postgres',
                              connect_timeout=5) as cnx, cnx.cursor() as cur:
            return dashboard.server_activity(cur, our_pids)
    SharedBudget(state, 5, role='http')
    data = dashboard.collect(dashboard.shared_figures(state), {'host': '127.0.0.1', 'port': port},
                             activity, {}, True)
    assert data['totals']['budget'] == 5 and 'max_connections' not in data['totals']
    assert data['servers'][0]['health'] == 'down'
    assert len(data['errors']) == 1
    assert f'The database server 127.0.0.1:{port} did not answer' in data['errors'][0]
    assert 'refused' in data['errors'][0] or 'connect' in data['errors'][0]


def test_without_a_shared_state_the_figures_are_those_of_the_serving_process(pools, info):
    """db_pool_shared = off: the process's own pools, no budget, nothing parked."""
    pool = pools(4)
    held = [pool.borrow(info('db2')), pool.borrow(info('db1')), pool.borrow(info('db1'))]
    pool.give_back(held.pop())
    figures = dashboard.local_figures([pool.snapshot()], 'threaded')
    assert figures['totals'] == {'held': 3, 'in_use': 2, 'idle': 1, 'long_lived': 0,
                                 'parked': 0, 'waiting': 0, 'budget': None,
                                 'cron_reserve': None, 'min_idle': None}
    [row] = figures['workers']
    assert (row['pid'], row['role'], row['held'], row['borrows']) == (os.getpid(), 'threaded', 3, 3)
    assert row['longest']['database'] == 'db2' and figures['history'] == []
    assert not dashboard.collect(figures, {}, lambda pids: None, {}, True)['shared']
    for cnx in held:
        pool.give_back(cnx)
