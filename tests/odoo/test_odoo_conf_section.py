"""db_pooling's options in odoo.conf's [db_pooling] section, read by real Odoo servers
(16.0-19.0, every tree found; skipped without Odoo), and the old place, [options]."""
import os
import time

import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.devtools.odoo_runner import OdooServer

from testkit import requires_odoo

pytestmark = requires_odoo
TOKEN = 'conf-section-token-0123456789'
MOVE_NOTE = 'read from [options] of'


def server(odoo_tree, pg, tmp_path, name, options=None, **kwargs):
    """A prefork server (1 HTTP worker, so a gevent process too) serving no database, with
    a budget of 7 and a metrics token that can only come from the config file."""
    os.chmod(tmp_path, 0o755)
    return OdooServer(odoo_tree, pg, str(tmp_path), name=name, options={
        'workers': 1, 'dbfilter': '^no_database_here$', 'db_pool_max_connections': 7,
        'db_pool_metrics_token': TOKEN, **(options or {})}, **kwargs)


def wait_for_both_processes(srv, timeout=60):
    """The log once the master and the gevent process have both installed our pool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = srv.log()
        if log.count('db_pooling active in process') >= 2:
            return log
        time.sleep(0.3)
    raise AssertionError(f'the gevent process did not install the pool:\n{srv.log_tail()}')


def run(srv):
    """Start ``srv``, then (log, budget in its shared state, metrics status, metrics text)."""
    srv.start()
    try:
        log = wait_for_both_processes(srv)
        state = ss.SharedState(srv.options['db_pool_shared_path'], create=False)
        try:
            budget = state.cells[ss.H_BUDGET]
        finally:
            state.close()
        return (log, budget, *srv.metrics(TOKEN))
    finally:
        srv.stop()


def test_options_in_the_db_pooling_section_take_effect(odoo_tree, pg, tmp_path):
    srv = server(odoo_tree, pg, tmp_path, 'section', options={'db_pool_idle_timeout': 7})
    log, budget, status, text = run(srv)
    conf = open(srv.conffile).read()
    assert '[db_pooling]\ndb_pool_shared_path = ' in conf and 'db_pool_' not in \
        conf[:conf.index('[db_pooling]')]
    assert budget == 7                      # db_pool_max_connections (and db_pool_shared_path)
    assert status == 200 and '\nodoo_db_pool_budget 7\n' in text, text[:300]
    assert 'db_pool_idle_timeout=7,' in log and 'db_pool_max_connections=7,' in log
    assert 'one budget of 7 server connections' in log
    assert 'unknown option' not in log      # Odoo 19 would log one per db_pool_* in [options]
    assert MOVE_NOTE not in log and 'set both in' not in log


def test_options_in_the_old_place_still_work_with_one_note(odoo_tree, pg, tmp_path):
    """db_pooling's options in [options], one of them also in [db_pooling]: all are read, the
    section's value wins, and the master alone says so (once each), not the gevent process."""
    srv = server(odoo_tree, pg, tmp_path, 'oldplace', options={'db_pool_idle_timeout': 9},
                 pooling_section='options', sections={'db_pooling': {'db_pool_idle_timeout': 8}})
    log, budget, status, _ = run(srv)
    assert budget == 7 and status == 200
    assert 'db_pool_idle_timeout=8,' in log and 'db_pool_idle_timeout=9,' not in log
    assert log.count(MOVE_NOTE) == 1
    [note] = [line for line in log.splitlines() if MOVE_NOTE in line]
    assert 'WARNING' in note
    assert (f'db_pool_max_connections, db_pool_shared_path, db_pool_metrics_token read from '
            f'[options] of {srv.conffile}: move them to a [db_pooling] section') in note
    assert log.count('set both in') == 1
    assert (f'db_pooling: db_pool_idle_timeout set both in [db_pooling] and in [options] of '
            f'{srv.conffile}: the [db_pooling] value is used') in log
    if odoo_tree.major >= 19:               # what the section spares
        assert "unknown option 'db_pool_max_connections'" in log


@pytest.mark.parametrize('section, message', [
    ({'db_pool_wait_timeout': '-5'},
     "db_pool_wait_timeout = '-5' in {conf} [db_pooling] is not valid: expected a number of "
     "seconds >= 0"),
    ({'db_pool_max_conections': '3'},
     'db_pool_max_conections in [db_pooling] of {conf} is not a db_pooling option (did you '
     'mean db_pool_max_connections?)'),
    ({'db_host': '127.0.0.1'},
     'db_host in [db_pooling] of {conf} is an Odoo option, which Odoo reads from [options] '
     'only: move it there.'),
], ids=['bad value', 'misspelt', 'odoo option'])
def test_a_bad_line_in_the_section_stops_startup(odoo_tree, pg, tmp_path, section, message):
    srv = server(odoo_tree, pg, tmp_path, 'badsection', sections={'db_pooling': section})
    proc = srv.run('--stop-after-init', check=False, timeout=120)
    assert proc.returncode != 0
    expected = 'db_pooling cannot start: ' + message.format(conf=srv.conffile)
    for text in (proc.stdout, srv.log()):
        assert expected in text, text[-3000:]
