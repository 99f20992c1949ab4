"""Real Odoo behind a real PgBouncer in transaction mode, with db_direct_host/port.

The cron worker's ``LISTEN cron_trigger`` and the gevent process's ``LISTEN
imbus`` connections (database ``postgres``) must go straight to PostgreSQL: a
NOTIFY sent through the pooler then wakes the cron worker within seconds
(instead of at its next 60 s poll) and reaches a websocket client. Both tests
fail with db_direct_host unset (checked by hand; the pool-level control is in
tests/engine/test_pgbouncer.py)."""
import datetime
import os
import time

import pytest

from odoo_pool_patch.devtools.odoo_runner import OdooServer

from testkit import notify_through, ODOO_TREES, requires_odoo

pytestmark = requires_odoo


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


# ---------------------------------------------------------------- bus
def session_cookie(session):
    for handler in session.opener.handlers:
        jar = getattr(handler, 'cookiejar', None)
        if jar is not None:
            return next(c.value for c in jar if c.name == 'session_id')
    raise AssertionError('no session cookie')


class WebSocket:
    """Just enough RFC 6455 to subscribe to Odoo's bus and read its frames."""

    def __init__(self, port, path, cookie, timeout=30):
        import base64
        import socket
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n'
            f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n'
            f'Origin: http://127.0.0.1:{port}\r\nCookie: session_id={cookie}\r\n\r\n').encode())
        head = b''
        while b'\r\n\r\n' not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f'websocket handshake refused: {head!r}'
            head += chunk
        assert head.startswith(b'HTTP/1.1 101'), head[:300]
        self.buffer = head.split(b'\r\n\r\n', 1)[1]

    def send_json(self, data):
        import json
        import struct
        payload = json.dumps(data).encode()
        mask = os.urandom(4)
        header = bytes([0x81]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                                  else bytes([0x80 | 126]) + struct.pack('!H', len(payload)))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError('websocket closed by the server')
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_text(self):
        import struct
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack('!H', self._read(2))[0]
        elif length == 127:
            length = struct.unpack('!Q', self._read(8))[0]
        payload = self._read(length)
        if first & 0x0F == 0x8:
            raise EOFError(f'websocket closed by the server: {payload!r}')
        return payload.decode(errors='replace')

    def close(self):
        self.sock.close()


def test_bus_notification_reaches_a_websocket_client(server, bouncer):
    import json
    cookie = session_cookie(server.session(server.db))
    ws = WebSocket(server.options['gevent_port'], '/websocket', cookie)
    try:
        ws.send_json({'event_name': 'subscribe', 'data': {'channels': ['dbp_probe'], 'last': 0}})
        time.sleep(3)       # the gevent process subscribes (and its bus listener starts)
        # What bus.bus._sendone then its post-commit hook send, through the pooler.
        channel = json.dumps([server.db, 'dbp_probe'], separators=(',', ':'))
        message = json.dumps({'type': 'dbp_probe', 'payload': {'hello': 'bus'}})
        cnx = __import__('psycopg2').connect(host=bouncer.host, port=bouncer.port,
                                             dbname=server.db, user='odoo')
        try:
            with cnx.cursor() as cur:
                cur.execute("INSERT INTO bus_bus (channel, message, create_date, write_date) "
                            "VALUES (%s, %s, now() at time zone 'UTC', now() at time zone 'UTC')",
                            (channel, message))
            cnx.commit()
        finally:
            cnx.close()
        notify_through(bouncer, 'imbus', json.dumps([[server.db, 'dbp_probe']]))
        ws.sock.settimeout(20)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = ws.read_text()
            if 'dbp_probe' in text:
                assert 'hello' in text
                return
        raise AssertionError('no bus notification within 20 s:\n' + server.log_tail())
    finally:
        ws.close()


def test_without_direct_address_the_listen_through_the_pooler_is_named(pg, bouncer, tmp_path):
    """Without db_direct_host, Odoo's LISTEN through the transaction pooler gives one
    warning naming the statement and the options to set (newest series only)."""
    tree = ODOO_TREES[-1]
    os.chmod(tmp_path, 0o755)
    srv = OdooServer(tree, pg, str(tmp_path), options={
        'workers': 2, 'max_cron_threads': 1, 'db_host': bouncer.host, 'db_port': bouncer.port})
    srv.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 'needs a real PostgreSQL session' not in srv.log():
            time.sleep(0.5)
        warnings = [line for line in srv.log().splitlines()
                    if 'needs a real PostgreSQL session' in line]
    finally:
        srv.stop()
    assert warnings, srv.log_tail()
    assert any('LISTEN cron_trigger' in line and 'db_direct_host' in line for line in warnings)
