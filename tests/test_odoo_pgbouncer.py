"""Real Odoo behind a real PgBouncer in transaction mode, with db_direct_host/port.

The cron worker's ``LISTEN cron_trigger`` connection (database ``postgres``)
must go straight to PostgreSQL: a NOTIFY sent through the pooler then wakes it
within seconds instead of at its next 60 s poll (through the pooler it would
never hear it, see tests/test_pgbouncer.py's control)."""
import datetime
import os
import time

import pytest

from odoo_pool_patch.odoo_runner import OdooServer, available_trees
from tests.conftest import notify_through

TREES, WHY_NOT = available_trees()
pytestmark = pytest.mark.skipif(not TREES, reason=WHY_NOT or 'no Odoo')


@pytest.fixture(scope='module', params=TREES or [None], ids=lambda t: t.series if t else 'none')
def odoo_tree(request):
    return request.param


@pytest.fixture(scope='module')
def server(odoo_tree, pg, bouncer, tmp_path_factory):
    """Prefork Odoo (2 HTTP workers, 1 cron worker) whose db_host is the pooler."""
    workdir = str(tmp_path_factory.mktemp(f'odoo-bouncer{odoo_tree.major}'))
    os.chmod(workdir, 0o755)
    srv = OdooServer(odoo_tree, pg, workdir, options={
        'workers': 2, 'max_cron_threads': 1,
        'db_host': bouncer.host, 'db_port': bouncer.port,
        'db_direct_host': pg.host, 'db_direct_port': pg.port})
    srv.db = f'dbpb_{odoo_tree.major}'
    srv.run('-d', srv.db, '-i', 'bus', '--stop-after-init')
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_cron_trigger_wakes_the_cron_worker_within_seconds(server, bouncer):
    uid = server.login(server.db)
    call = lambda model, method, *args, **kw: server.execute(  # noqa: E731
        server.db, uid, 'admin', model, method, *args, **kw)
    model_id = call('ir.model', 'search', [('model', '=', 'res.partner')])[0]
    values = {'name': 'dbp wake-up probe', 'model_id': model_id, 'state': 'code',
              'code': 'model.browse()', 'interval_number': 1, 'interval_type': 'days',
              'nextcall': '2099-01-01 00:00:00'}
    if 'numbercall' in call('ir.cron', 'fields_get', ['numbercall']):
        values['numbercall'] = -1
    cron_id = call('ir.cron', 'create', values)
    # Let the cron worker finish its start-up pass and go to sleep (60 s + jitter).
    time.sleep(3)
    now = datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M:%S')
    call('ir.cron.trigger', 'create', {'cron_id': cron_id, 'call_at': now})
    notify_through(bouncer, 'cron_trigger', server.db)    # what ir.cron._notifydb sends
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        if call('ir.cron', 'read', [cron_id], ['lastcall'])[0]['lastcall']:
            break
        time.sleep(0.5)
    lastcall = call('ir.cron', 'read', [cron_id], ['lastcall'])[0]['lastcall']
    assert lastcall, 'the cron worker did not wake up:\n' + server.log_tail()
