"""PgBouncer-aware mode against a real PgBouncer in transaction mode.

LISTEN through a transaction pooler silently never receives anything (the
control test shows it); with db_direct_host/db_direct_port the pool sends the
``postgres``-database connections (bus, cron wake-ups) to PostgreSQL itself.
"""
import logging
import select
import time

import pytest

from odoo_pool_patch.sessions import session_tracking
from odoo_pool_patch.config.options import Settings

from testkit import notify_through


@pytest.fixture
def via_bouncer(bouncer, info):
    def make(dbname='db1'):
        return info(dbname, host=bouncer.host, port=bouncer.port)
    return make


def received(cnx, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poller = select.poll()              # (select() fails for descriptors >= 1024)
        poller.register(cnx.fileno(), select.POLLIN)
        poller.poll(200)
        cnx.poll()
        if cnx.notifies:
            return [n.payload for n in cnx.notifies]
    return []


def listen(pool, connection_info, channel):
    cnx = pool.borrow(connection_info)
    cnx.autocommit = True        # as Odoo's bus and cron listeners do
    with cnx.cursor() as cur:
        cur.execute(f'LISTEN {channel}')
    return cnx


def test_control_listen_through_transaction_pooler_hears_nothing(pools, bouncer, via_bouncer):
    pool = pools(2, settings=Settings())
    cnx = listen(pool, via_bouncer('postgres'), 'dbp_ctl')
    notify_through(bouncer, 'dbp_ctl', 'lost')
    assert received(cnx, 1.5) == []
    pool.give_back(cnx, keep_in_pool=False)


def test_notify_through_pooler_reaches_direct_listen(pg, pools, bouncer, via_bouncer):
    pool = pools(2, settings=Settings(direct_host=pg.host, direct_port=pg.port))
    cnx = listen(pool, via_bouncer('postgres'), 'dbp_direct')
    assert cnx.info.port == pg.port and cnx.pooled.direct
    assert 'keepalives=1' in cnx.dsn
    notify_through(bouncer, 'dbp_direct', 'hello')
    assert received(cnx, 10) == ['hello']
    # Other databases still go through the pooler.
    other = pool.borrow(via_bouncer('db1'))
    assert other.info.port != pg.port and not other.pooled.direct
    pool.give_back(other)
    pool.give_back(cnx, keep_in_pool=False)


def test_session_statement_through_pooler_warns_once(pg, pools, via_bouncer, info, caplog):
    session_tracking._warned.clear()
    session_tracking._verdicts.clear()
    pool = pools(2, settings=Settings())
    caplog.set_level(logging.WARNING, logger='odoo.sql_db')
    for _ in range(2):
        cnx = pool.borrow(via_bouncer('db2'))
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_try_advisory_lock(77)')
        cnx.rollback()
        pool.give_back(cnx)
    warnings = [r.getMessage() for r in caplog.records if 'real PostgreSQL session' in r.getMessage()]
    assert len(warnings) == 1
    assert 'pg_try_advisory_lock(77)' in warnings[0] and 'db_direct_host' in warnings[0]
    # Straight to PostgreSQL: no warning.
    caplog.clear()
    cnx = pool.borrow(info('db2'))
    with cnx.cursor() as cur:
        cur.execute('SELECT pg_try_advisory_lock(78)')
    cnx.rollback()
    pool.give_back(cnx)
    assert not [r for r in caplog.records if 'real PostgreSQL session' in r.getMessage()]
