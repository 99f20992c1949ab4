"""Replica routing at engine level: a real primary and two pg_basebackup streaming replicas."""
import threading
import time

import psycopg2
import pytest

from odoo_pool_patch.devtools.embedded_pg import Cluster
from odoo_pool_patch.errors import ConfigError
from odoo_pool_patch.observability.metrics import render_servers
from odoo_pool_patch.config.options import Settings, load_settings
from odoo_pool_patch.replicas.replica_health import (ACTIVE, MAX_BAN_FACTOR, servers_status,
                                                    start_routing)
from odoo_pool_patch.replicas import router as replicas
from odoo_pool_patch.config.options import parse_replicas
from odoo_pool_patch.replicas.router import Target, targets_from_config, written_lsn
from odoo_pool_patch.shared.shared_state import SharedState


def wait_for(predicate, timeout=30.0, interval=0.1):
    return Cluster.wait_until(None, predicate, timeout, interval)   # uses no cluster


@pytest.fixture
def routing(pg, replica_set, tmp_path, pools, info):
    """routing(weights=(1, 1), **settings) -> (read-only pool, read/write pool, router)."""
    made = []

    def make(weights=(1, 1), required_lsn=None, maxconn=4, **values):
        settings = Settings(**{'replica_ban_time': 1.0, **values})
        state = SharedState(str(tmp_path / f'state{len(made)}'))
        targets = [Target(0, pg.host, pg.port, 0, 'primary')] + [
            Target(i, r.host, r.port, w) for i, (r, w) in enumerate(zip(replica_set, weights), 1)]
        router = start_routing(state, targets, settings,
                               {'user': 'odoo', 'sslmode': 'disable'}, required_lsn)
        made.append((router, state))
        ro, rw = pools(maxconn, readonly=True, settings=settings), pools(4, settings=settings)
        ro.router = rw.router = router
        return ro, rw, router
    yield make
    for router, state in made:
        router.stop()
        if ACTIVE.get('router') is router:      # the process-wide routing of start_routing
            ACTIVE.clear()


def served_by(pool, connection_info):
    """Port of the server that serves a cursor of ``pool`` (and give it back)."""
    cnx = pool.borrow(connection_info)
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT inet_server_port()')
            port = cur.fetchone()[0]
        cnx.rollback()
        return port
    finally:
        pool.give_back(cnx)


def status(router):
    router.table.add_counts(*router.take_counts())      # what the monitor thread does
    return {row['name']: row for row in servers_status(router)}


# ---------------------------------------------------------------------- configuration
def test_db_replicas_parsing_and_errors():
    assert parse_replicas('r1:5433, r2:5434:3 ,[::1]:5435:0, r4') == (
        ('r1', 5433, 1), ('r2', 5434, 3), ('::1', 5435, 0), ('r4', 5432, 1))
    with pytest.raises(ConfigError) as error:
        load_settings({'db_replicas': 'r1:notaport'}.get)
    assert "db_replicas = 'r1:notaport'" in str(error.value)
    assert 'host:port[:weight]' in str(error.value)


def test_stock_replica_options_are_a_one_replica_list():
    conf = {'db_host': 'p', 'db_port': '5432', 'db_replica_host': 'r', 'db_replica_port': 6432}
    primary, replica = targets_from_config(Settings(), conf.get)
    assert (primary.host, primary.port, replica.host, replica.port) == ('p', 5432, 'r', 6432)
    # Odoo 18's empty db_replica_host ("same server") and 19's None: no replica.
    for empty in ('', None, False):
        assert len(targets_from_config(Settings(), dict(conf, db_replica_host=empty).get)) == 1
    # db_replicas wins over the stock options.
    both = targets_from_config(Settings(replicas=(('a', 1, 2), ('b', 2, 1))), conf.get)
    assert [(t.host, t.weight) for t in both] == [('p', 0), ('a', 2), ('b', 1)]


# ---------------------------------------------------------------------- routing
def test_reads_spread_by_weight_writes_and_postgres_go_to_primary(pg, replica_set, routing,
                                                                    info, app):
    ro, rw, router = routing(weights=(1, 3))
    first, second = replica_set
    ports = [served_by(ro, info('db1')) for _ in range(200)]
    assert set(ports) == {first.port, second.port}
    assert ports.count(second.port) > 1.5 * ports.count(first.port) > 0
    assert {served_by(rw, info('db1')) for _ in range(10)} == {pg.port}
    assert {served_by(ro, info('postgres')) for _ in range(10)} == {pg.port}
    # Seen from the servers: the read-only pool's db1 connections are on the replicas only.
    assert first.count_connections(app, 'db1') and second.count_connections(app, 'db1')
    assert pg.count_connections(app, 'db1') == 1          # the read/write pool's one
    rows = status(router)
    assert rows[f'127.0.0.1:{first.port}']['reads'] == \
        ports.count(first.port)
    assert rows[f'127.0.0.1:{second.port}']['reads'] == ports.count(second.port)
    assert rows[f'127.0.0.1:{pg.port}']['writes'] == 10
    assert rows[f'127.0.0.1:{pg.port}']['kind'] == 'primary'
    # The same figures in Prometheus text, labelled by server.
    from prometheus_client.parser import text_string_to_metric_families
    text = '\n'.join(render_servers(servers_status(router))) + '\n'
    reads = {s.labels['server']: s.value for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == 'odoo_db_pool_server_reads_total'}
    assert reads[f'127.0.0.1:{second.port}'] == ports.count(second.port)


def test_stopped_replica_reads_move_then_come_back(pg, replica_set, routing, info):
    ro, rw, router = routing(weights=(1, 1), replica_ban_time=3.0)
    first, second = replica_set
    assert {served_by(ro, info('db1')) for _ in range(40)} == {first.port, second.port}
    first.stop()
    try:
        # No borrow fails; the very first one after the stop already lands elsewhere.
        ports = [served_by(ro, info('db1')) for _ in range(40)]
        assert first.port not in ports and second.port in ports
        row = status(router)[f'127.0.0.1:{first.port}']
        assert row['health'] == 'banned' and row['banned_until'] > time.time()
        # With the other replica stopped too, reads go to the primary (read-only session).
        second.stop()
        try:
            cnx = ro.borrow(info('db1'))
            cnx.set_session(readonly=True)
            with cnx.cursor() as cur:
                cur.execute('SELECT inet_server_port()')
                assert cur.fetchone()[0] == pg.port
                with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                    cur.execute('CREATE TABLE must_fail (id int)')
            cnx.rollback()
            ro.give_back(cnx)
            assert status(router)[f'127.0.0.1:{pg.port}']['fallbacks']['banned'] >= 1
        finally:
            second.start()
    finally:
        first.start()
    back = time.monotonic()
    # Back within the (grown) ban time: the background probe lifts the ban.
    assert wait_for(lambda: served_by(ro, info('db1')) == first.port, timeout=60, interval=0.05)
    longest_ban = MAX_BAN_FACTOR * 3.0 * 1.2
    assert time.monotonic() - back < longest_ban + 10     # probe period + a loaded machine
    # A ban that ran out lets reads through before the next probe says 'healthy'.
    assert wait_for(lambda: status(router)[f'127.0.0.1:{first.port}']['health'] == 'healthy',
                    timeout=10)


def _writer(pg, stop):
    cnx = pg.connect('db1', application_name='dbpool-writer')
    try:
        with cnx.cursor() as cur:
            cur.execute('CREATE TABLE IF NOT EXISTS lag_probe (id serial, at timestamptz)')
            while not stop.is_set():
                cur.execute('INSERT INTO lag_probe (at) VALUES (now())')
                stop.wait(0.1)
    finally:
        cnx.close()


def test_paused_replay_stops_reads_until_resumed(pg, replica_set, routing, info):
    ro, rw, router = routing(weights=(1, 1), replica_max_lag=1.0)
    first, second = replica_set
    name = f'127.0.0.1:{second.port}'
    served_by(ro, info('db1'))        # the first routed borrow starts the monitor
    # An idle primary does not make replicas look late.
    assert wait_for(lambda: status(router)[name]['lag_seconds'] == 0, timeout=20)
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(pg, stop))
    second.sql('SELECT pg_wal_replay_pause()')
    writer.start()
    try:
        assert wait_for(lambda: status(router)[name]['health'] == 'lagging', timeout=30), \
            status(router)[name]
        row = status(router)[name]
        assert row['lag_bytes'] > 0 and row['lag_seconds'] > 1.0
        assert second.port not in {served_by(ro, info('db1')) for _ in range(30)}
        assert status(router)[name]['fallbacks']['lagging'] >= 30
    finally:
        second.sql('SELECT pg_wal_replay_resume()')
        stop.set()
        writer.join()
    assert wait_for(lambda: served_by(ro, info('db1')) == second.port, timeout=30, interval=0.05)


def _write(rw, info, required, value, connection_info=None):
    """Set ryw.v to ``value`` on the primary; ``required[0]``: the WAL position to read it."""
    cnx = rw.borrow(connection_info or info('db1'))
    with cnx.cursor() as cur:
        cur.execute('UPDATE ryw SET v = %s', [value])
    cnx.commit()
    required[0] = written_lsn(cnx)
    rw.give_back(cnx)


def _read_your_writes_trials(pg, ro, rw, info, required, trials):
    """Write then read at once, ``trials`` times; returns the number of stale reads."""
    stale = 0
    for value in range(1, trials + 1):
        _write(rw, info, required, value)
        cnx = ro.borrow(info('db1'))
        with cnx.cursor() as cur:
            cur.execute('SELECT v FROM ryw')
            stale += cur.fetchone()[0] != value
        cnx.rollback()
        ro.give_back(cnx)
    return stale


@pytest.fixture
def delayed_replica(pg, replica_set):
    """replica2 replays WAL 1.5 s late (recovery_min_apply_delay); reads of ryw on it lag."""
    second = replica_set[1]
    pg.sql('CREATE TABLE IF NOT EXISTS ryw (v int)', dbname='db1')
    pg.sql('TRUNCATE ryw; INSERT INTO ryw VALUES (0)', dbname='db1')
    second.sql("ALTER SYSTEM SET recovery_min_apply_delay = '1500ms'")
    second.reload()
    yield second
    second.sql('ALTER SYSTEM RESET recovery_min_apply_delay')
    second.reload()


def test_read_your_writes_never_reads_stale_and_off_does(pg, delayed_replica, routing, info):
    required = [None]
    # Only the delayed replica takes reads (weight 0 drains replica1).
    ro, rw, router = routing(weights=(0, 1), required_lsn=lambda: required[0],
                             replica_max_lag=60.0)
    assert _read_your_writes_trials(pg, ro, rw, info, required, 30) == 0
    pinned = status(router)[f'127.0.0.1:{delayed_replica.port}']['fallbacks']['pinned']
    assert pinned >= 25
    # Once it has replayed the last write, the replica serves that session again.
    assert wait_for(lambda: served_by(ro, info('db1')) == delayed_replica.port, timeout=30)
    # The same trials with read-your-writes off do read stale values: the test can fail.
    ro_off, rw_off, _ = routing(weights=(0, 1), required_lsn=lambda: required[0],
                                replica_max_lag=60.0, replica_read_your_writes=False)
    assert _read_your_writes_trials(pg, ro_off, rw_off, info, required, 5) >= 3


@pytest.mark.parametrize('stick', [replicas.STICK, 0.0])
def test_reads_keep_to_the_replica_the_pool_holds_a_connection_to(pg, replica_set, routing, info,
                                                                   monkeypatch, stick):
    """A pool with room for one connection (a tight budget) keeps to the replica it holds
    a connection to nine times out of ten, instead of reconnecting at every other read;
    both replicas still get their share. Control: with STICK = 0 it reconnects ~half the
    time."""
    monkeypatch.setattr(replicas, 'STICK', stick)
    ro, _rw, _router = routing(weights=(1, 1), maxconn=1)
    first, second = replica_set
    ports = [served_by(ro, info('db1')) for _ in range(300)]
    if stick:
        assert ro.stats.opened < 60
        assert ports.count(first.port) >= 30 and ports.count(second.port) >= 30
    else:
        assert ro.stats.opened > 100


def test_uri_connection_infos_are_never_lent_across_databases(pg, replica_set, routing, app):
    """A read-only borrow with a URI (``dsn``) connection_info goes to the primary as
    asked, never with the connection_info of another database's write."""
    ro, rw, _router = routing()

    def uri(database):
        return {'dsn': f'postgresql://odoo@{pg.host}:{pg.port}/{database}?sslmode=disable',
                'application_name': app}
    cnx = rw.borrow(uri('db2'))
    rw.give_back(cnx)
    cnx = ro.borrow(uri('db3'))
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT current_database()')
            assert cur.fetchone()[0] == 'db3'
        cnx.rollback()
    finally:
        ro.give_back(cnx)


def _write_and_wait_for_replay(pg, rw, info, replica, required, value, connection_info=None):
    _write(rw, info, required, value, connection_info)
    replayed = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint"
    assert wait_for(lambda: replica.sql(replayed)[0][0] >= required[0], timeout=30)


def test_pinned_reads_ask_the_replica_then_use_the_writing_connection(pg, replica_set, routing,
                                                                      info, app, monkeypatch):
    """Read-your-writes with the shared replay positions left stale (no probe): a replica
    that has replayed the session's write serves its next read, found by asking it on the
    pool's idle connection; without that question (the control) the read is pinned to the
    primary, and takes the read/write pool's connection there instead of opening one."""
    pg.sql('CREATE TABLE IF NOT EXISTS ryw (v int)', dbname='db1')
    pg.sql('TRUNCATE ryw; INSERT INTO ryw VALUES (0)', dbname='db1')
    required = [None]
    ro, rw, router = routing(weights=(1, 0), required_lsn=lambda: required[0],
                             replica_max_lag=60.0)
    first = replica_set[0]
    assert served_by(ro, info('db1')) == first.port     # ro now holds a connection there
    router.stop()
    router.monitor = None           # no more probes: the shared replay position stays old
    # Odoo's read/write connection_info may differ from its read-only one (here: no port,
    # as Odoo leaves it out when db_port is not set; libpq takes PGPORT).
    monkeypatch.setenv('PGPORT', str(pg.port))
    written = {k: v for k, v in info('db1').items() if k != 'port'}
    _write_and_wait_for_replay(pg, rw, info, first, required, 1, written)
    assert served_by(ro, info('db1')) == first.port
    assert status(router)[f'127.0.0.1:{first.port}']['fallbacks']['pinned'] == 0

    monkeypatch.setattr(replicas.Router, '_replayed', lambda self, *args: (None, None))
    _write_and_wait_for_replay(pg, rw, info, first, required, 2, written)
    opened = ro.stats.opened, rw.stats.opened
    cnx = ro.borrow(info('db1'))
    assert cnx in rw.books.used                               # lent by the read/write pool
    cnx.set_session(readonly=True)                       # as Odoo's read-only cursor does
    with cnx.cursor() as cur:
        cur.execute('SELECT inet_server_port(), v FROM ryw')
        assert cur.fetchone() == (pg.port, 2)
    cnx.rollback()
    ro.give_back(cnx)
    assert (ro.stats.opened, rw.stats.opened) == opened
    assert pg.count_connections(app, 'db1') == 1
    assert status(router)[f'127.0.0.1:{first.port}']['fallbacks']['pinned'] == 1
    # Back in the read/write pool, the connection writes again: the read-only session ended.
    again = rw.borrow(written)
    assert again is cnx
    with again.cursor() as cur:
        cur.execute('UPDATE ryw SET v = 3')
    again.commit()
    rw.give_back(again)


def test_dashboard_shows_every_server_and_a_stopped_replica(routing, replica_set, pg, info):
    """The dashboard's server table comes from the routing's shared rows."""
    from odoo_pool_patch.observability import dashboard
    ro, _rw, router = routing()
    state = router.table.state
    data = dashboard.collect(dashboard.shared_figures(state), {'host': pg.host, 'port': pg.port},
                             lambda pids: None, {}, True)
    assert [(e['kind'], int(e['port'])) for e in data['servers']] == [
        ('primary', pg.port), ('replica', replica_set[0].port), ('replica', replica_set[1].port)]
    assert all(e['health'] == 'healthy' for e in data['servers'][1:])
    replica_set[0].stop()
    try:
        for _ in range(20):         # a borrow that meets the stopped replica bans it
            served_by(ro, info('db1'))
        router.monitor.flush()
        data = dashboard.collect(dashboard.shared_figures(state),
                                 {'host': pg.host, 'port': pg.port}, lambda pids: None, {}, True)
        first = data['servers'][1]
        assert first['health'] in ('banned', 'down'), first
        assert any(f':{replica_set[0].port}) is {first["health"]}' in e for e in data['errors'])
    finally:
        replica_set[0].start()


def test_a_replica_restarted_while_banned_is_healthy_at_the_first_probe_after(
        pg, replica_set, tmp_path):
    """Banned servers are not probed, so the probe's session to a replica that restarted
    meanwhile is one the server ended: the probe judges the server on a new session
    instead of banning it again (for a longer time) when its ban runs out."""
    from odoo_pool_patch.replicas.replica_health import Prober, ServerTable
    first = replica_set[0]
    targets = [Target(0, pg.host, pg.port, 0, 'primary'), Target(1, first.host, first.port, 1)]
    table = ServerTable(SharedState(str(tmp_path / 'state')), targets)
    prober = Prober(table, {'user': 'odoo', 'sslmode': 'disable'})
    try:
        prober.probe()
        assert table.status()[1]['health'] == 'healthy' and 1 in prober.connections
        first.stop()
        first.start()
        prober.probe()
        assert table.status()[1]['health'] == 'healthy', table.status()[1]
    finally:
        prober.close()
