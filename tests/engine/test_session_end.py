"""How a session the server ended looks to the client, plain and over TLS, and what the
request retry (odoo_pool_patch.odoo_glue.request_retry) makes of it: real PostgreSQL, real
pg_terminate_backend and idle_in_transaction_session_timeout."""
import shutil
import threading
import time

import psycopg2
import pytest

from odoo_pool_patch.odoo_glue.request_retry import _session_end, ended_by_server

from testkit import client_info



def failure(connect, killer, how):
    """The error of a statement on a connection whose session ends ``how``."""
    cnx = connect()
    try:
        cur = cnx.cursor()
        cur.execute('SELECT 1')
        pid = cnx.get_backend_pid()
        query = 'SELECT 1'
        if how == 'terminated idle':
            killer(pid)
        elif how == 'terminated running':
            threading.Timer(0.3, killer, (pid,)).start()
            query = 'SELECT pg_sleep(3)'
        else:       # the transaction's idle timeout
            cur.execute('SET LOCAL idle_in_transaction_session_timeout = 100')
            time.sleep(0.5)
        with pytest.raises(psycopg2.OperationalError) as caught:
            cur.execute(query)
        assert cnx.closed == 2
        return caught.value
    finally:
        cnx.close()


def terminator(cluster):
    def kill(pid):
        cluster.sql('SELECT pg_terminate_backend(%s)', [pid])
        cluster.wait_until(lambda: not cluster.sql(
            'SELECT 1 FROM pg_stat_activity WHERE pid = %s', [pid]))
    return kill


@pytest.mark.parametrize('how, plain', [
    # libpq mostly loses the server's FATAL 57P01 and reports the closed socket
    ('terminated running', {'code', 'eof'}),
    ('terminated idle', {'eof'}),
    ('idle timeout', {'eof'}),          # the same as a kill: the retry's timeout check
])
def test_plain(pg, info, how, plain):
    data = info()
    params = dict(dbname=data['database'], host=data['host'], port=data['port'],
                  user=data['user'])
    exc = failure(lambda: psycopg2.connect(**params), terminator(pg), how)
    assert _session_end(exc) in plain, exc
    assert ended_by_server(exc)


@pytest.mark.skipif(not shutil.which('openssl'), reason='openssl not installed')
@pytest.mark.parametrize('how', ['terminated running', 'terminated idle', 'idle timeout'])
def test_tls(tls_pg, pki, how):  # noqa: F811
    """Over TLS libpq says only that the connection closed, even for a backend
    terminated while it ran (no SQLSTATE): still the server's doing."""
    data = client_info(tls_pg, pki)
    data['dbname'] = data.pop('database')
    exc = failure(lambda: psycopg2.connect(**data), terminator(tls_pg), how)
    assert _session_end(exc) == 'eof', exc
