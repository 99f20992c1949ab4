"""odoo-pool check against real servers: a good configuration and each kind of bad one."""
import subprocess
import sys

import pytest

from odoo_pool_patch.devtools.embedded_pg import Cluster, free_port
from odoo_pool_patch.devtools.odoo_runner import conf_text


def check(tmp_path, pooling_section='db_pooling', sections=None, **options):
    """odoo-pool check of an odoo.conf with ``options``: db_pooling's in ``pooling_section``."""
    conf = tmp_path / 'odoo.conf'
    conf.write_text(conf_text(options, pooling_section, sections))
    proc = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'check', '-c', str(conf)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def base(pg):
    return {'db_host': pg.host, 'db_port': pg.port, 'db_user': 'odoo', 'workers': 8,
            'max_cron_threads': 1}


def test_good_configuration_passes(pg, tmp_path):
    code, out = check(tmp_path, **base(pg))
    assert code == 0, out
    assert f'primary {pg.host}:{pg.port}: connected, NOT encrypted' in out
    assert 'budget 12 (db_pool_max_connections) fits in the 197 connections' in out
    assert 'all checks passed' in out


@pytest.mark.parametrize('options, expected', [
    ({'db_pool_wait_timeout': 'soon'}, "db_pool_wait_timeout = 'soon' in {conf} [db_pooling] is "
                                       "not valid"),
    ({'db_sslrootcert': '/nope/ca.crt'}, 'db_sslrootcert = /nope/ca.crt in {conf} [db_pooling] '
                                         'does not exist'),
    ({'db_sslmode': 'verify-full'}, 'db_sslmode = verify-full in {conf} [options] needs the CA'),
    ({'db_pool_max_connections': 500}, 'budget 500 (db_pool_max_connections) exceeds what the '
                                       'primary accepts: 197'),
    ({'db_pool_shared': 'off', 'db_maxconn': 64}, 'worst case 704 without a shared budget'),
])
def test_each_bad_configuration_is_reported(pg, tmp_path, options, expected):
    code, out = check(tmp_path, **{**base(pg), **options})
    assert code == 1 and expected.format(conf=tmp_path / 'odoo.conf') in out, out
    assert 'problem(s) in' in out


def test_options_in_the_old_place_are_read_with_a_note(pg, tmp_path):
    """db_pooling's options in [options], as before [db_pooling]: read, and one note to move
    them; one set in both places takes the section's value, with a note naming both."""
    conf = tmp_path / 'odoo.conf'
    code, out = check(tmp_path, pooling_section='options', **base(pg),
                      db_pool_max_connections=500, db_pool_wait_timeout=5)
    assert code == 1 and 'budget 500 (db_pool_max_connections) exceeds' in out, out
    assert out.count('note    ') == 1, out
    assert (f'note    db_pooling: db_pool_wait_timeout, db_pool_max_connections read from '
            f'[options] of {conf}: move them to a [db_pooling] section') in out
    code, out = check(tmp_path, pooling_section='options', **base(pg),
                      db_pool_max_connections=500,
                      sections={'db_pooling': {'db_pool_max_connections': 20}})
    assert code == 0 and 'budget 20 (db_pool_max_connections) fits' in out, out
    assert (f'note    db_pooling: db_pool_max_connections set both in [db_pooling] and in '
            f'[options] of {conf}: the [db_pooling] value is used') in out
    assert 'read from [options]' not in out


def test_names_the_section_does_not_take_are_reported(pg, tmp_path):
    code, out = check(tmp_path, **base(pg), sections={'db_pooling': {
        'db_pool_max_conections': 20, 'workers': 4}})
    conf = tmp_path / 'odoo.conf'
    assert code == 1, out
    assert (f'PROBLEM db_pool_max_conections in [db_pooling] of {conf} is not a db_pooling option '
            f'(did you mean db_pool_max_connections?)') in out
    assert f'PROBLEM workers in [db_pooling] of {conf} is an Odoo option' in out


def test_unreadable_config_file_is_named(tmp_path):
    missing = tmp_path / 'missing.conf'
    proc = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'check', '-c',
                           str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f'cannot read {missing}' in proc.stderr, proc.stderr


def test_unreachable_server_is_reported(pg, tmp_path):
    code, out = check(tmp_path, **{**base(pg), 'db_port': free_port()})
    assert code == 1 and 'cannot connect' in out and 'primary 127.0.0.1' in out, out


def test_unreachable_replica_is_reported(pg, tmp_path):
    code, out = check(tmp_path, **{**base(pg), 'db_replica_host': '127.0.0.1',
                                   'db_replica_port': free_port()})
    assert code == 1 and 'replica 127.0.0.1' in out and 'cannot connect' in out, out
    assert 'primary' in out and f'{pg.port}: connected' in out


def test_tls_checked_against_the_server(tmp_path, pki):
    cluster = Cluster('check-tls').init().start()
    try:
        cluster.create_role('odoo')
        cluster.enable_tls(pki)
        good = {'db_host': 'localhost', 'db_port': cluster.port, 'db_user': 'odoo',
                'db_sslmode': 'verify-full', 'db_sslrootcert': pki.path('ca.crt'),
                'db_sslcert': pki.path('client.crt'), 'db_sslkey': pki.path('client.key')}
        code, out = check(tmp_path, **good)
        assert code == 0 and 'connected, TLS TLSv1.' in out, out
        code, out = check(tmp_path, **{**good, 'db_sslrootcert': pki.path('other-ca.crt')})
        assert code == 1 and 'not signed by the CA in db_sslrootcert' in out, out
    finally:
        cluster.destroy()


def test_every_replica_is_checked(pg, replica_set, tmp_path):
    first, second = replica_set
    replicas = f'{first.host}:{first.port}:2,{second.host}:{second.port}'
    code, out = check(tmp_path, **{**base(pg), 'db_replicas': replicas})
    assert code == 0, out
    for replica in replica_set:
        assert f'replica {replica.host}:{replica.port}: streaming replica, ' in out, out
    # The primary listed as a replica would serve reads that miss writes: refused.
    code, out = check(tmp_path, **{**base(pg), 'db_replicas': f'{pg.host}:{pg.port}'})
    assert code == 1 and 'is not a replica (pg_is_in_recovery() is false)' in out, out
