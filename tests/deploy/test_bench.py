"""The benchmarks run with one command and keep their promises (short runs, no Odoo arm;
the chaos benchmark runs its db_pooling arm on real Odoo)."""
import json
import os
import subprocess
import sys

import psycopg2
import pytest

from testkit import ROOT

sys.path.insert(0, ROOT)

from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer  # noqa: E402


def test_pgbouncer_helper_pools_transactions(pg, app):
    """Three clients, one transaction each in turn: one server connection (transaction
    mode; session mode would hold three)."""
    bouncer = PgBouncer(pg).start()
    clients = []
    try:
        for _ in range(3):
            cnx = psycopg2.connect(host=bouncer.host, port=bouncer.port, user='odoo',
                                   dbname='db1', application_name=app)
            clients.append(cnx)
            with cnx.cursor() as cur:
                cur.execute('SELECT 1')
            cnx.commit()
        assert pg.count_connections(app) == 1
    finally:
        for cnx in clients:
            cnx.close()
        bouncer.destroy()
    assert bouncer.process is None and not os.path.exists(bouncer.base)


def run_bench(script, tmp_path, *args):
    out = tmp_path / f'{script}.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', f'{script}.py'),
                           '--no-odoo', '--json', str(out), *args], cwd=ROOT, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return {row['arm']: row for row in json.loads(out.read_text())['rows']}, proc.stdout


def test_footprint_runs_and_the_shared_budget_holds(tmp_path):
    rows, out = run_bench('footprint', tmp_path, '--seconds', '1.5', '--idle-timeout', '1',
                          '--workers', '4', '--databases', '3', '--budget', '5')
    assert 'stock' in out and rows['stock'] == {'arm': 'stock'}        # n/a without Odoo
    for arm in ('pgbouncer', 'per-proc', 'shared'):
        assert rows[arm]['errors'] == 0 and rows[arm]['done'] > 0, rows[arm]
    assert rows['per-proc']['peak'] > 5 >= rows['shared']['peak'], rows
    assert rows['shared']['at_rest'] <= 1 and rows['per-proc']['at_rest'] == 0


def test_overload_never_exceeds_the_budget_and_never_fails(tmp_path):
    rows, _ = run_bench('overload', tmp_path, '--seconds', '2', '--budget', '3',
                        '--workers', '2', '--databases', '2')
    shared = rows['shared']
    assert shared['errors'] == 0 and shared['done'] > 0, shared
    assert shared['peak'] <= 3 and shared['over'] == 'no', shared


def test_replicas_bench_routes_reads_to_replicas_without_stale_reads(tmp_path):
    """Both replicas serve reads, the session's own writes are always seen with
    db_pooling, and the stock-like single replica arm reads only from the first one."""
    rows, _ = run_bench('replicas', tmp_path, '--seconds', '2', '--workers', '2',
                        '--databases', '1', '--budget', '8')
    ours, one = rows['db_pooling'], rows['one-replica']
    assert ours['errors'] == 0 and ours['reads'] > 0 and ours['stale'] == 0, ours
    assert ours['replica_share'] > 0.5, ours
    assert rows['primary']['replica_share'] == 0 and one['replica_share'] == 1, rows
    assert one['replica_peak'].endswith('/0'), one


def test_chaos_bench_on_real_odoo_loses_nothing_and_rides_out_restarts(tmp_path):
    """bench/chaos.py, db_pooling arm only, shortened: every acknowledged record is found
    once in its own database, and no request that began after PostgreSQL came back
    (from a fast restart, from a 2 s stop) fails."""
    from odoo_pool_patch.devtools.odoo_runner import available_trees
    trees, why_not = available_trees()
    if not trees:
        pytest.skip(f'needs Odoo: {why_not}')
    out = tmp_path / 'chaos.json'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench', 'chaos.py'), '--arms', 'db_pooling',
         '--rounds', '1', '--workers', '2', '--databases', '2', '--clients', '4',
         '--warmup', '6', '--phase', '2', '--outage', '2', '--after', '3', '--no-replica',
         '--odoo', trees[-1].path, '--json', str(out)],
        cwd=ROOT, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    row, = json.loads(out.read_text())['rows']
    assert row['requests'] > 40, row
    assert (row['lost'], row['dup'], row['misplaced'], row['wrong_reads']) == (0, 0, 0, 0), row
    assert row['after-restart'] == 0 and row['after-primary'] == 0, row['late']
    assert row['restart'] <= 4 and row['primary'] <= 4, row        # the 4 clients in flight


def test_instances_bench_holds_one_budget_for_several_odoo_instances(tmp_path):
    """bench/odoo_instances.py, db_pooling arm only, shortened: two real Odoo instances
    with one budget of 6 serve the web client's load without an error and never hold
    more server connections together than that budget."""
    from odoo_pool_patch.devtools.odoo_runner import available_trees
    trees, why_not = available_trees()
    if not trees:
        pytest.skip(f'needs Odoo: {why_not}')
    out = tmp_path / 'instances.json'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench', 'odoo_instances.py'), '--arms',
         'db_pooling', '--instances', '2', '--workers', '1', '--databases', '2',
         '--clients', '3', '--budget', '6', '--warmup', '8', '--seconds', '3',
         '--idle-timeout', '1', '--odoo', trees[-1].path, '--json', str(out)],
        cwd=ROOT, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    row, = json.loads(out.read_text())['rows']
    assert row['errors'] == 0 and row['requests'] > 5, row
    assert 2 <= row['peak'] <= 6, row
