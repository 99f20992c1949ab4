"""Connections taken from another process (exchange, parking): the stand-in start-up,
cancel(), what ``cnx.info`` says, GSSAPI-encrypted connections and a squatter on the
stand-in. A taken connection's libpq started against a stand-in (an abstract Unix
socket answered by a thread of the taker), so everything libpq itself knows of the
session (cancel key and address, pid, host) is the stand-in's. Real PostgreSQL, real
forked processes."""
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
import traceback

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import pytest

from odoo_pool_patch.shared import exchange
from odoo_pool_patch.pool import sessions as pool_sessions
from odoo_pool_patch.shared import shared_state as ss

from testkit import backend_pid
from testkit.peers import make_pool, parked_by_a_worker, Peer, run_sleep, server_name, start_donor, stop, taken



def run_in_child(function):
    """function() in a forked child: its JSON result, or the child's traceback raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                            # pragma: no cover - child
        try:
            try:
                out = {'result': function()}
            except BaseException:           # noqa: BLE001
                out = {'error': traceback.format_exc()}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, 'rb') as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    out = json.loads(data or b'{"error": "the child died"}')
    if 'error' in out:
        raise AssertionError('in the child:\n' + out['error'])
    return out['result']


# ------------------------------------------------------------------ 1. libpq environment
# (libpq tries no TLS or GSS on a Unix socket: PGSSLMODE, PGGSSENCMODE... only matter if
# the start-up went elsewhere, as PGHOSTADDR or a service file's hostaddr would send it.)
ENVIRONMENTS = [
    {'PGHOSTADDR': '127.0.0.1'}, {'PGHOST': '127.0.0.1'}, {'PGPORT': '5432'},
    {'PGSSLMODE': 'require'}, {'PGSSLNEGOTIATION': 'direct'}, {'PGGSSENCMODE': 'require'},
    {'PGCHANNELBINDING': 'require'}, {'PGTARGETSESSIONATTRS': 'read-write'},
    {'PGOPTIONS': '-c work_mem=1MB'}, {'PGREQUIREAUTH': 'password'},
    {'PGPASSFILE': '{passfile}'}, {'PGSERVICE': 'dbp', 'PGSERVICEFILE': '{servicefile}'},
    {'PGCONNECT_TIMEOUT': '1'}, {'PGLOADBALANCEHOSTS': 'random'}, {'PGAPPNAME': 'intruder'},
    {'PGCLIENTENCODING': 'LATIN1'}, {'PGDATABASE': 'nope'}, {'PGUSER': 'nope'},
]


@pytest.fixture
def port_5432():
    """A TCP listener on 127.0.0.1:5432 (where libpq would send a start-up it aims at
    host 127.0.0.1 and the stand-in's port): [[peer address, bytes received], ...]."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(('127.0.0.1', 5432))
    except OSError as exc:
        listener.close()
        pytest.skip(f'127.0.0.1:5432 is taken ({exc}): cannot watch for a start-up sent there')
    listener.listen(16)
    received = []

    def record(conn, entry):
        with conn:
            conn.settimeout(5)
            try:
                while chunk := conn.recv(4096):
                    entry[1] += chunk
            except OSError:
                pass

    def serve():
        while True:
            try:
                conn, address = listener.accept()
            except OSError:
                return
            received.append([address, b''])
            threading.Thread(target=record, args=(conn, received[-1]), daemon=True).start()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield received
    listener.shutdown(socket.SHUT_RDWR)     # wakes accept() (Linux)
    listener.close()
    thread.join(5)


@pytest.mark.parametrize('environment', ENVIRONMENTS, ids=lambda env: '+'.join(env))
def test_the_stand_in_start_up_ignores_the_libpq_environment(
        pg, info, tmp_path, port_5432, environment):
    """The taker sets a libpq variable (in its process only: a forked child) and takes the
    donor's idle connection: the stand-in start-up goes to the stand-in whatever the
    variable says, and nothing reaches 127.0.0.1:5432. The taker only takes, never
    opens (some variables would break a new real connection too)."""
    passfile, servicefile = tmp_path / 'pgpass', tmp_path / 'pg_service.conf'
    passfile.write_text('*:*:*:*:secret\n')
    passfile.chmod(0o600)
    servicefile.write_text('[dbp]\nhost=127.0.0.1\nport=5432\nhostaddr=127.0.0.1\n'
                           'sslmode=require\n')
    environment = {name: value.format(passfile=passfile, servicefile=servicefile)
                   for name, value in environment.items()}
    path = str(tmp_path / 'segment')
    taker_app = info()['application_name'] + '-taker'
    donor, donor_backend = start_donor(path, info('db2'))

    def take():
        logs = []
        handler = logging.Handler()
        handler.emit = lambda record: logs.append(record.getMessage())
        logging.getLogger('odoo.sql_db').addHandler(handler)
        logging.getLogger('odoo.sql_db').setLevel(logging.INFO)
        os.environ.update(environment)
        pool = make_pool(path)
        try:
            cnx = pool.borrow(info('db2', application_name=taker_app))
            with cnx.cursor() as cur:
                cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
                backend, app = cur.fetchone()
            cnx.commit()
            return [backend, app, pool.stats.taken, pool.stats.opened, logs]
        finally:
            pool.shutdown()
    try:
        backend, app, taken_, opened, logs = run_in_child(take)
    finally:
        stop(donor)
    assert (backend, app, taken_, opened) == (donor_backend, taker_app, 1, 0), logs
    assert port_5432 == [], f'{environment} sent the stand-in start-up to 127.0.0.1:5432'


# ------------------------------------------------------------------ 2. cancel()


@pytest.mark.parametrize('source', ['exchange', 'parking'])
def test_cancel_interrupts_a_query_on_a_taken_connection(pg, info, tmp_path, source):
    with taken(source, str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        thread, outcome = run_sleep(cnx)
        time.sleep(0.5)
        # Control: libpq's own cancel targets the stand-in (gone, key 0): nothing stops.
        with contextlib.suppress(psycopg2.OperationalError):
            ext.connection.cancel(cnx)
        thread.join(1.0)
        assert thread.is_alive() and not outcome
        started = time.monotonic()
        cnx.cancel()
        thread.join(5.0)
        assert not thread.is_alive() and time.monotonic() - started < 3.0
        assert isinstance(outcome[0], psycopg2.errors.QueryCanceled), outcome
        cnx.rollback()
        assert backend_pid(cnx) == backend  # still usable, the same session
        cnx.commit()
        pool.give_back(cnx)


# ------------------------------------------------------------------ 3. backend pid, host, port
def check_info(pg, cnx, backend):
    with cnx.cursor() as cur:
        cur.execute('SELECT pg_backend_pid()')
        assert cur.fetchone()[0] == backend == cnx.info.backend_pid == cnx.get_backend_pid()
    cnx.commit()
    assert (cnx.info.host, cnx.info.port) == (pg.host, pg.port)
    assert ext.connection.info.__get__(cnx).host.startswith('@db_pooling-take-')  # libpq's


def test_a_taken_connection_reports_its_real_backend_host_and_port(pg, info, tmp_path):
    """Also once its psycopg2 object, kept as a shell, took another session: its libpq
    still reports the first session's pid."""
    path = str(tmp_path / 'segment')
    peer, pool = Peer(path, info), make_pool(path)
    try:
        first = peer.do('borrow', 'db2')
        peer.do('back', 'db2')
        cnx = pool.borrow(info('db2'))
        check_info(pg, cnx, first)
        pool.give_back(cnx)
        assert peer.do('borrow', 'db2') == first        # taken back: ours kept as a shell
        peer.do('close', 'db2')
        second = peer.do('borrow', 'db2')               # another session
        peer.do('back', 'db2')
        again = pool.borrow(info('db2'))
        assert again is cnx and pool.stats.taken == 2 and second != first
        check_info(pg, again, second)
        assert ext.connection.get_backend_pid(again) == first   # why the pool's is needed
        pool.give_back(again)
    finally:
        peer.stop()
        pool.shutdown()


# ------------------------------------------------------------------ 4. GSSAPI encryption
def test_gss_in_use_asks_libpq(pg):
    cnx = pg.connect('db1')
    try:
        assert exchange.gss_in_use(cnx) is False
        assert exchange._GSS[0] not in (None, False) and callable(exchange._GSS[0])
    finally:
        cnx.close()
    assert exchange.gss_in_use(cnx) is False        # closed


def fake_gss(monkeypatch, where):
    """No GSSAPI server can run here (no KDC, no keytab): gss_in_use is made to say
    True, where the pool imported it (prepare_connection) and/or in exchange (offerable)."""
    for module in {'pool': [pool_sessions], 'exchange': [exchange],
                   'both': [pool_sessions, exchange], 'none': []}[where]:
        monkeypatch.setattr(module, 'gss_in_use', lambda cnx: True)


@pytest.mark.parametrize('where', ['both', 'pool', 'exchange', 'none'])
def test_a_gss_encrypted_connection_is_never_offered(pg, info, tmp_path, monkeypatch, where):
    fake_gss(monkeypatch, where)            # before forking: the donor inherits it
    path = str(tmp_path / 'segment')
    donor, donor_backend = start_donor(path, info('db2'))
    pool = make_pool(path)
    try:
        cnx = pool.borrow(info('db2'))
        moved = where == 'none'             # control
        assert (backend_pid(cnx) == donor_backend) == moved
        assert (pool.stats.taken, pool.stats.opened) == ((1, 0) if moved else (0, 1))
        cnx.commit()
        pool.give_back(cnx)
    finally:
        stop(donor)
        pool.shutdown()


@pytest.mark.parametrize('where', ['both', 'pool', 'exchange', 'none'])
def test_a_gss_encrypted_connection_is_never_parked(pg, info, tmp_path, monkeypatch, where):
    fake_gss(monkeypatch, where)            # before forking the workers
    peers, shared = [], None
    try:
        _make, _backend, shared, parked = parked_by_a_worker(str(tmp_path / 'segment'),
                                                             info, peers)
        assert parked == shared.state.cells[ss.H_PARKED] == (1 if where == 'none' else 0)
    finally:
        for peer in peers:
            peer.stop()
        if shared is not None:
            shared.exchange.close()


# ------------------------------------------------------------------ 5. squatter
@pytest.mark.parametrize('uid', [None, 65534], ids=['same-user', 'nobody'])
def test_a_squatter_on_the_stand_in_does_not_delay_the_start_up(pg, uid):
    """Another process (another user, or ours in another pid) connected to the stand-in
    before libpq, with a start-up packet of its own: hung up on, given nothing, and
    libpq's start-up is answered at once."""
    if uid is not None and os.geteuid() != 0:
        pytest.skip('needs root to run a process as another user')
    name = f'db_pooling-take-test{os.getpid()}'
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f'\0{name}/.s.PGSQL.5432')
    listener.listen(8)
    read_end, write_end = os.pipe()
    squatter = os.fork()
    if squatter == 0:                       # pragma: no cover - child
        try:
            if uid is not None:
                os.setuid(uid)
            end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            end.connect(f'\0{name}/.s.PGSQL.5432')
            body = b'user\0nobody\0database\0db1\0\0'
            end.sendall(struct.pack('!ii', 8 + len(body), 196608) + body)
            os.write(write_end, b'c')
            end.settimeout(5)
            try:
                os.write(write_end, b'D' if end.recv(4096) else b'E')
            except ConnectionResetError:
                os.write(write_end, b'E')
            except socket.timeout:
                os.write(write_end, b'T')
        finally:
            os._exit(0)
    os.close(write_end)
    served, thread, cnx = [], None, None
    try:
        assert os.read(read_end, 1) == b'c'         # queued first
        real = pg.connect('db1')
        params = exchange.session_params(real)
        real.close()
        reply = exchange._startup_reply(params + [('application_name', 'served')], 4242)
        thread = threading.Thread(target=exchange._serve_startup,
                                  args=(listener, reply, served), daemon=True)
        thread.start()
        started = time.monotonic()
        cnx = psycopg2.connect(host='@' + name, port=5432, connect_timeout=2, dbname='db1',
                               user='odoo', **exchange._FAKE_OPTIONS)
        assert time.monotonic() - started < 1.0   # connect_timeout: 2
        assert cnx.info.parameter_status('application_name') == 'served'
        assert cnx.get_backend_pid() == 4242
        assert os.read(read_end, 1) == b'E'         # hung up on, given nothing
    finally:
        if thread is not None:
            thread.join(3)
        for end in served:
            end.close()
        listener.close()
        if cnx is not None:
            cnx.close()
        os.close(read_end)
        stop(squatter, signal.SIGKILL)


# ------------------------------------------------------------------ 6. the session's name


def first_transaction(cnx, end):
    """One statement, then ``end`` ('commit' or 'rollback'): the name it saw."""
    with cnx.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        seen = cur.fetchone()[0]
    getattr(cnx, end)()
    return seen


@pytest.mark.parametrize('source', ['exchange', 'parking'])
def test_a_taken_connection_is_named_by_its_first_committed_transaction(
        pg, info, tmp_path, source):
    taker = info()['application_name'] + '-taker'
    with taken(source, str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        # No round trip on the way in: the session still has its donor's name...
        donor_name = server_name(pg, backend)
        assert donor_name != taker and cnx.pooled.name == taker
        # ...until the first transaction: its first statement carries the SET. A
        # rollback undoes it on the server, so the name stays pending.
        assert first_transaction(cnx, 'rollback') == taker
        assert server_name(pg, backend) == donor_name
        assert (cnx.pooled.app, cnx.pooled.name) == (donor_name, taker)
        assert first_transaction(cnx, 'commit') == taker
        assert server_name(pg, backend) == taker
        assert (cnx.pooled.app, cnx.pooled.name) == (taker, None)
        pool.give_back(cnx)
        again = pool.borrow(info('db2', application_name=taker))
        assert again is cnx and 'application_name' not in again.pooled.prefix
        assert first_transaction(again, 'commit') == taker
        pool.give_back(again)


@pytest.mark.parametrize('statement', ["SET work_mem = '8MB'", 'DO $$BEGIN END$$'],
                         ids=['reset-all', 'discard-all'])
def test_a_reset_taken_connection_is_named_again(pg, info, tmp_path, statement):
    """RESET ALL (after a SET) and DISCARD ALL (after a DO) put back the name the session
    started with, its first holder's: the next borrow names it again, in its first
    transaction."""
    taker = info()['application_name'] + '-taker'
    with taken('exchange', str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        start_name = server_name(pg, backend)
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')     # (a transaction's first SET carries no prefix:
            cur.execute(statement)      # it may be SET TRANSACTION)
        cnx.commit()
        assert server_name(pg, backend) == taker
        pool.give_back(cnx)
        again = pool.borrow(info('db2', application_name=taker))
        assert again is cnx and server_name(pg, backend) == start_name != taker
        assert again.pooled.name == taker and again.pooled.prefix.startswith('SET application_name')
        assert first_transaction(again, 'commit') == taker
        assert server_name(pg, backend) == taker
        pool.give_back(again)


def test_a_connection_given_on_before_its_name_counted_carries_the_real_one(
        pg, info, tmp_path):
    """Taken, never committed, given on: the next taker learns the name the session
    really has (its first holder's), not the one the middle process wanted."""
    path = str(tmp_path / 'segment')
    donor, backend = start_donor(path, info('db2'))
    peer = Peer(path, info)
    pool = make_pool(path)
    try:
        donor_name = info()['application_name']
        cnx = pool.borrow(info('db2', application_name=donor_name + '-taker'))
        assert backend_pid(cnx) == backend      # (a transaction that rolls back)
        cnx.rollback()
        assert server_name(pg, backend) == donor_name
        assert exchange.session_meta(cnx)['app'] == donor_name
        assert exchange.session_meta(cnx)['app0'] == donor_name
        pool.give_back(cnx)
        assert peer.do('borrow', 'db2') == backend
        assert server_name(pg, backend) == donor_name + '-peer'
        peer.do('back', 'db2')
    finally:
        peer.stop()
        stop(donor)
        pool.shutdown()


class ForeignConnection(ext.connection):
    """A connection class that knows nothing of us (as Odoo's PsycoConnection)."""


def test_a_connection_class_without_our_mixin_can_take_a_session(pg, info, tmp_path):
    """The stand-in a take starts is of the pool's connection class; with one that does not
    mix SessionTracking in, it has no record until it is marked a shell (failed: every take
    was abandoned and the donor's session closed)."""
    path = str(tmp_path / 'segment')
    peer, pool = Peer(path, info), make_pool(path)
    pool.connection_factory = ForeignConnection
    try:
        donor = peer.do('borrow', 'db2')
        peer.do('back', 'db2')
        cnx = pool.borrow(info('db2'))
        assert (pool.stats.taken, backend_pid(cnx)) == (1, donor)
        assert isinstance(cnx, ForeignConnection) and cnx.pooled.shell
        pool.give_back(cnx)
    finally:
        peer.stop()
        pool.shutdown()
