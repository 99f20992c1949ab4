"""TLS to a real PostgreSQL with ssl=on, a test CA and client certificates (hostssl ... cert)."""
import os
import shutil

import psycopg2
import pytest

from odoo_pool_patch.config import tls
from odoo_pool_patch.devtools.embedded_pg import Cluster, ThrowawayPKI
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit import client_info

pytestmark = pytest.mark.skipif(not shutil.which('openssl'), reason='openssl not installed')


def conf(**values):
    return lambda name: values.get(name)


def test_verify_full_with_client_certificate_connects_over_tls(tls_pg, pki):
    pool = ConnectionPool(2)
    cnx = pool.borrow(client_info(tls_pg, pki))
    with cnx.cursor() as cur:
        cur.execute('SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()')
        encrypted, version = cur.fetchone()
    assert encrypted and version.startswith('TLSv1')
    state = tls.SERVERS[('localhost', str(tls_pg.port))]
    assert state['encrypted'] and state['protocol'] == version and state['cipher']
    assert not state['flagged']
    pool.give_back(cnx)
    pool.shutdown()


def test_wrong_ca_fails_with_clear_message(tls_pg, pki):
    pool = ConnectionPool(2)
    with pytest.raises(psycopg2.OperationalError) as excinfo:
        pool.borrow(client_info(tls_pg, pki, rootcert='other-ca.crt'))
    message = str(excinfo.value)
    assert 'not signed by the CA in db_sslrootcert' in message
    assert f'localhost:{tls_pg.port} with sslmode=verify-full' in message
    assert pool.snapshot()['opening'] == 0                  # the slot came back
    pool.shutdown()


def test_wrong_host_name_fails_with_clear_message(tls_pg, pki):
    pool = ConnectionPool(2)
    with pytest.raises(psycopg2.OperationalError, match='not for this host name'):
        pool.borrow(client_info(tls_pg, pki, host='127.0.0.1'))
    # verify-ca checks the CA only: the same address then works.
    cnx = pool.borrow(client_info(tls_pg, pki, host='127.0.0.1', mode='verify-ca'))
    pool.give_back(cnx)
    pool.shutdown()


def test_missing_client_certificate_is_explained(tls_pg, pki):
    pool = ConnectionPool(2)
    with pytest.raises(psycopg2.OperationalError, match='client certificate|certificate'):
        pool.borrow(client_info(tls_pg, pki, client=False))
    pool.shutdown()


def test_plain_connection_refused_by_tls_only_server(tls_pg):
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host='127.0.0.1', port=tls_pg.port, user='odoo', dbname='db1',
                         sslmode='disable')


def test_primary_and_replica_settings_resolve_separately(pki):
    get = conf(db_sslmode='verify-full', db_sslrootcert=pki.path('ca.crt'),
               db_replica_sslrootcert=pki.path('other-ca.crt'), db_replica_sslmode='verify-ca',
               db_sslcert=pki.path('client.crt'), db_sslkey=pki.path('client.key'))
    assert tls.tls_keywords(get)['sslrootcert'] == pki.path('ca.crt')
    replica = tls.tls_keywords(get, replica=True)
    assert replica['sslrootcert'] == pki.path('other-ca.crt')
    assert replica['sslcert'] == pki.path('client.crt')      # inherited from the primary
    assert tls.sslmode(get, replica=True) == 'verify-ca'
    assert tls.validate(get) == []
    env = tls.pg_environ(get, {})
    assert env['PGSSLMODE'] == 'verify-full' and env['PGSSLROOTCERT'] == pki.path('ca.crt')
    assert env['PGSSLKEY'] == pki.path('client.key')


def test_bad_tls_files_are_reported_at_start_up(pki, tmp_path):
    loose = tmp_path / 'loose.key'
    loose.write_text(open(pki.path('client.key')).read())
    os.chmod(loose, 0o644)
    cases = {
        'db_sslrootcert = /nope/ca.crt does not exist':
            conf(db_sslmode='verify-full', db_sslrootcert='/nope/ca.crt'),
        'is readable by group or others (mode 0644)':
            conf(db_sslcert=pki.path('client.crt'), db_sslkey=str(loose)),
        'db_sslmode = verify-full needs the CA':
            conf(db_sslmode='verify-full'),
        "db_sslmode = 'verify' is not a libpq sslmode":
            conf(db_sslmode='verify'),
        'db_sslkey is missing':
            conf(db_sslcert=pki.path('client.crt')),
        "db_replica_sslmode = 'sometimes' is not a libpq sslmode":
            conf(db_replica_sslmode='sometimes'),
        'must be an absolute path':
            conf(db_sslrootcert='ca.crt'),
        "ssl_min_protocol_version = 'SSLv3' is not one of":
            conf(db_ssl_min_protocol_version='SSLv3'),
    }
    home_ca = os.path.expanduser('~/.postgresql/root.crt')
    for expected, get in cases.items():
        if 'needs the CA' in expected and os.path.exists(home_ca):
            continue
        problems = ' '.join(tls.validate(get))
        assert expected in problems, (expected, problems)
    if os.geteuid() != 0:
        unreadable = tmp_path / 'secret.crt'
        unreadable.write_text('x')
        os.chmod(unreadable, 0)
        assert 'is not readable' in ' '.join(tls.validate(conf(db_sslrootcert=str(unreadable))))


def test_plain_text_under_prefer_is_flagged(pg, info):
    pool = ConnectionPool(2)
    cnx = pool.borrow(info(sslmode='prefer'))
    state = tls.SERVERS[(pg.host, str(pg.port))]
    assert state == {'sslmode': 'prefer', 'encrypted': False, 'protocol': None, 'cipher': None,
                     'flagged': True}
    pool.give_back(cnx)
    pool.shutdown()


def test_primary_and_replica_with_different_cas_both_connect(tls_pg, pki, tmp_path):
    """The replica's server has its own CA: db_replica_sslrootcert names it, while the client
    certificate settings are inherited from the primary's options."""
    other_dir = tmp_path / 'replica-pki'
    other_dir.mkdir()
    replica_pki = ThrowawayPKI(str(other_dir))
    replica = Cluster('tls-replica').init().start()
    try:
        replica.create_role('odoo')
        replica.create_database('db1')
        # Its server certificate comes from its own CA; it accepts the client certificate
        # signed by the primary's CA (the file it checks client certificates against).
        replica.enable_tls(replica_pki, tls_only=True)
        with open(pki.path('ca.crt')) as handle:
            replica.write_file('ca.crt', handle.read())
        replica.reload()
        get = conf(db_sslmode='verify-full', db_sslrootcert=pki.path('ca.crt'),
                   db_sslcert=pki.path('client.crt'), db_sslkey=pki.path('client.key'),
                   db_replica_sslrootcert=replica_pki.path('ca.crt'))
        assert tls.validate(get) == []
        pool = ConnectionPool(4)
        for cluster, replica_side in ((tls_pg, False), (replica, True)):
            info = {'database': 'db1', 'host': 'localhost', 'port': cluster.port, 'user': 'odoo',
                    'sslmode': tls.sslmode(get, replica_side),
                    **tls.tls_keywords(get, replica=replica_side)}
            cnx = pool.borrow(info)
            with cnx.cursor() as cur:
                cur.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')
                assert cur.fetchone() == (True,)
            pool.give_back(cnx)
            # And the other side's CA does not verify this server.
            wrong = dict(info, sslrootcert=tls.tls_keywords(get, replica=not replica_side)[
                'sslrootcert'])
            with pytest.raises(psycopg2.OperationalError, match='not signed by the CA'):
                pool.borrow(wrong)
        pool.shutdown()
    finally:
        replica.destroy()
