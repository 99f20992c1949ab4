"""Waiting through PostgreSQL outages (outage.py): real servers stopped and restarted,
real forked processes, a TCP relay that counts the connection attempts."""
import socket
import threading
import time

import psycopg2
import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.devtools.embedded_pg import Cluster
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.shared.outage import OutageTimeout
from odoo_pool_patch.shared.backend_exit import is_dead
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit.forks import collect, fork



@pytest.fixture(scope='module')
def server():
    """A cluster of this module's own: its tests stop and restart it."""
    cluster = Cluster('outage').init().start()
    try:
        cluster.create_role('odoo')
        cluster.create_database('db1')
        cluster.create_database('db2')
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def running(server):
    """The module's server, started again after the test whatever it did."""
    yield server
    if not server.is_running():
        server.start()


class Relay:
    """127.0.0.1:port -> the server. Counts the connections clients open; while the
    server is down it accepts and closes them at once (libpq: "server closed the
    connection unexpectedly"). :meth:`freeze` makes the sessions open so far go silent
    both ways, ends included, as a dead host behind a virtual IP does."""

    def __init__(self, server):
        self.server = server
        self.accepted = 0
        self.refuse = 0             # close that many next connections at once
        self.frozen_below = 0       # sessions numbered below this one are frozen
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self):
        self.frozen_below = self.accepted + 1

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            session = self.accepted
            if self.refuse:
                self.refuse -= 1
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.server.host, self.server.port), 2)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(session, source, sink),
                                 daemon=True).start()

    def _pump(self, session, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if session >= self.frozen_below:
                    sink.sendall(data)
        except OSError:
            pass
        if session < self.frozen_below:
            return                  # the other side never hears of it
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()


def connection_info(host, port, dbname='db1', app='dbpt-outage'):
    return {'database': dbname, 'user': 'odoo', 'host': host, 'port': port,
            'application_name': app, 'sslmode': 'disable'}


def restart_later(cluster, delay):
    thread = threading.Thread(target=lambda: (time.sleep(delay), cluster.start()), daemon=True)
    thread.start()
    return thread


def test_a_borrow_waits_for_a_stopped_server_and_gets_a_connection(running, pools):
    pool = pools(4, settings=Settings(wait_timeout=20))
    info = connection_info(running.host, running.port)
    pool.give_back(pool.borrow(info))            # reached once
    running.stop()
    starter = restart_later(running, 2.0)
    started = time.monotonic()
    cnx = pool.borrow(info)
    waited = time.monotonic() - started
    starter.join()
    with cnx.cursor() as cur:
        cur.execute('SELECT 1')
        assert cur.fetchone() == (1,)
    pool.give_back(cnx)
    assert waited >= 1.5        # it did wait for the server (control: it was down)


def test_an_outage_longer_than_the_wait_timeout_fails_after_it_not_before(running, pools):
    pool = pools(4, settings=Settings(wait_timeout=2))
    info = connection_info(running.host, running.port)
    pool.give_back(pool.borrow(info))
    running.stop()
    started = time.monotonic()
    with pytest.raises(OutageTimeout) as failure:
        pool.borrow(info)
    waited = time.monotonic() - started
    message = str(failure.value)
    assert 2.0 <= waited < 6, waited
    assert f'{running.host}:{running.port}' in message
    assert 'db_pool_wait_timeout = 2' in message and 'Last error:' in message
    assert 'Connection refused' in message or 'No such file' in message, message
    assert pool.books.opening == 0
    running.start()
    pool.give_back(pool.borrow(info))            # the slot came back


def test_a_server_never_reached_fails_at_once(pools):
    with socket.socket() as probe:                # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    pool = pools(2, settings=Settings(wait_timeout=20))
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError) as failure:
        pool.borrow(connection_info('127.0.0.1', port))
    assert time.monotonic() - started < 2
    assert not isinstance(failure.value, OutageTimeout)


def test_idle_connections_opened_before_an_outage_are_dropped_once_it_ends(running, pools):
    """Behind a relay that keeps the client's side of a dead session open (a failed-over
    host behind a virtual IP), the idle connections look alive; once a connection has
    waited through the outage, they are dropped instead of being lent."""
    relay = Relay(running)
    try:
        pool = pools(4, settings=Settings(wait_timeout=20), timer_period=0.2)
        info = connection_info('127.0.0.1', relay.port)
        first = [pool.borrow(info) for _ in range(2)]
        pids = {cnx.get_backend_pid() for cnx in first}
        for cnx in first:
            pool.give_back(cnx)
        relay.freeze()
        running.stop()
        starter = restart_later(running, 1.5)
        other = pool.borrow(connection_info('127.0.0.1', relay.port, 'db2'))  # waits
        starter.join()
        assert not any(is_dead(cnx) for cnx in first)     # control: they look alive
        deadline = time.monotonic() + 5
        while any(not cnx.closed for cnx in first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(cnx.closed for cnx in first)           # swept by maintenance
        result = {}
        worker = threading.Thread(target=lambda: result.update(cnx=pool.borrow(info)),
                                  daemon=True)
        worker.start()
        worker.join(10)
        cnx = result['cnx']
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_backend_pid()')
            assert cur.fetchone()[0] not in pids
        pool.give_back(cnx)
        pool.give_back(other)
    finally:
        relay.close()


def test_a_connect_refused_once_drops_no_connection(running, pools):
    """A load balancer's hiccup (one connection closed at once, the server never
    restarted) costs that borrower a retry, and nobody's idle connections."""
    relay = Relay(running)
    try:
        pool = pools(8, settings=Settings(wait_timeout=20))
        info = connection_info('127.0.0.1', relay.port)
        first = [pool.borrow(info) for _ in range(4)]
        pids = {cnx.get_backend_pid() for cnx in first}
        for cnx in first:
            pool.give_back(cnx)
        relay.refuse = 1
        other = pool.borrow(connection_info('127.0.0.1', relay.port, 'db2'))
        assert relay.refuse == 0                    # control: it was refused once
        again = [pool.borrow(info) for _ in range(4)]
        assert {cnx.get_backend_pid() for cnx in again} == pids
        for cnx in again + [other]:
            pool.give_back(cnx)
    finally:
        relay.close()


def _give_up_then_linger(port, path):
    pool = ConnectionPool(2, settings=Settings(wait_timeout=1.5),
                          budget=SharedBudget(ss.SharedState(path), 6))
    try:
        pool.borrow(connection_info('127.0.0.1', port))
        outcome = 'connected'
    except OutageTimeout:
        outcome = 'timed out'
    time.sleep(4)               # alive, not borrowing: its lease must not hold others up
    return outcome


def test_a_prober_that_gave_up_leaves_the_lease_to_others(running, tmp_path):
    path = str(tmp_path / 'state')
    info = connection_info(running.host, running.port)
    pool = ConnectionPool(2, settings=Settings(wait_timeout=20),
                          budget=SharedBudget(ss.SharedState(path), 6))
    try:
        pool.give_back(pool.borrow(info))
        running.stop()
        child = fork(_give_up_then_linger, running.port, path)
        time.sleep(2.2)                             # the child has timed out, lingers
        running.start()
        started = time.monotonic()
        pool.give_back(pool.borrow(info))   # a dead idle one, then an open: no lease wait
        assert time.monotonic() - started < 0.8
        assert collect(*child) == 'timed out'
    finally:
        pool.shutdown()


def test_what_is_no_outage_fails_at_once():
    from odoo_pool_patch.shared.outage import classify
    standby = psycopg2.OperationalError(
        'connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  the database '
        'system is not accepting connections\nDETAIL:  Hot standby mode is disabled.')
    assert classify(standby, True) is None
    for text in ('FATAL:  password authentication failed for user "odoo"',
                 'FATAL:  database "nope" does not exist',
                 'FATAL:  sorry, too many clients already'):
        assert classify(psycopg2.OperationalError(text), True) is None
    assert classify(psycopg2.OperationalError('FATAL:  the database system is starting up'),
                    False) == 2
    refused = psycopg2.OperationalError('connection to server at "127.0.0.1", port 1 failed: '
                                        'Connection refused')
    assert classify(refused, False) is None and classify(refused, True) == 6


def _worker(port, path, until, log):
    """A process of the instance: short transactions until ``until`` (wall time);
    returns [(started, finished, where it failed or None)]."""
    budget = SharedBudget(ss.SharedState(path), 6)
    pool = ConnectionPool(2, settings=Settings(wait_timeout=20), budget=budget)
    info = connection_info('127.0.0.1', port)
    runs = []
    while time.time() < until:
        started = time.time()
        try:
            cnx = pool.borrow(info)
        except psycopg2.Error as exc:
            runs.append((started, time.time(), 'borrow: ' + str(exc).splitlines()[0]))
            continue
        failed = None
        try:
            with cnx.cursor() as cur:
                cur.execute('SELECT pg_sleep(0.02)')
            cnx.commit()
        except psycopg2.Error as exc:
            failed = 'statement: ' + str(exc).splitlines()[0]
        pool.give_back(cnx, keep_in_pool=failed is None)
        runs.append((started, time.time(), failed))
    pool.shutdown()
    return runs


def test_processes_ride_out_a_restart_and_a_stop_with_one_prober(running, tmp_path):
    """Six processes of one instance, short transactions back to back, through a fast
    restart and then a 5 s stop: no borrow fails, only transactions running when the
    server went away do (one per process per event at most), and while the server is
    down the instance tries to connect as one prober would, not six."""
    relay = Relay(running)
    path = str(tmp_path / 'state')
    try:
        until = time.time() + 13
        children = [fork(_worker, relay.port, path, until, None) for _ in range(6)]
        time.sleep(2)
        running.restart('fast')
        time.sleep(2)
        stop_called = time.time()
        running.stop()
        before = relay.accepted
        time.sleep(5)
        attempts = relay.accepted - before
        running.start()
        up_at = time.time()
        results = [collect(*child) for child in children]
    finally:
        relay.close()
    assert all('error' not in result for result in results if isinstance(result, dict)), results
    failures = [run for runs in results for run in runs if run[2]]
    assert not [run for run in failures if run[2].startswith('borrow')], failures
    assert len(failures) <= 2 * len(results), failures
    # every process began a borrow while the server was down, served once it was back
    for runs in results:
        assert [run for run in runs if stop_called < run[0] < up_at - 1 and run[2] is None
                and run[1] >= up_at - 0.2], runs
    assert sum(len(runs) for runs in results) > 100
    # one prober: about ten attempts in 5 s (backoff 50 ms doubling to 1 s), six processes
    # each retrying on their own would make 60 or more
    assert attempts <= 25, attempts
    print(f'{attempts} connection attempts while the server was down for 5 s; '
          f'{len(failures)} transactions failed')
