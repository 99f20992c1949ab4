"""Attacks on the session's name sent with the first statement (session_tracking) and on
deferred parking inside a request (pool_sharing.deferred_parking): a name with % or quotes, a
commit that commits nothing, a statement never sent, psycopg2's own rollbacks, quoting
per database, errors and other threads while parking at the end of a request, replica
routing's wrapper, a donor without the start-up name. Each failed on the first version
of those changes. Real PostgreSQL, real forked processes (the fixtures of
test_taken_connections / test_parking)."""
import os
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from odoo_pool_patch.pool import sharing as pool_sharing
from odoo_pool_patch.shared import exchange

from testkit import NO_ODOO, ODOO_TREES, ROOT, backend_pid
from testkit.peers import make_pool, Peer, peer, run_sleep, server_name, start_donor, stop, taken



# ------------------------------------------------------------------ the session's name
def test_a_commit_of_a_failed_transaction_does_not_count_the_name(pg, info, tmp_path):
    """The transaction that carried SET application_name failed; Odoo-style code that
    catches the error and commits (psycopg2's commit() of an aborted transaction is a
    ROLLBACK on the server and raises nothing) must not make the pool believe the
    session has the new name."""
    taker = info()['application_name'] + '-taker'
    with taken('exchange', str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        donor_name = server_name(pg, backend)
        with cnx.cursor() as cur:
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute('SELECT 1/0')
        cnx.commit()                        # no exception: the server rolled back
        assert server_name(pg, backend) == donor_name
        assert cnx.pooled.app == donor_name and cnx.pooled.name == taker, \
            (cnx.pooled.app, cnx.pooled.name)


def test_after_a_commit_of_a_failed_transaction_the_name_is_never_set_and_cancel_misses(
        pg, info, tmp_path):
    """Consequence of the above, on a session that went donor -> peer (named by the
    peer) -> here: the next borrow sends no SET (the pool believes the name is there),
    the session keeps the peer's name, and cancel() (filtered on the names the pool
    believes: ours and the start-up one, the donor's) cancels nothing."""
    path = str(tmp_path / 'segment')
    donor, backend = start_donor(path, info('db2'))
    peer = Peer(path, info)
    pool = make_pool(path)
    taker = info()['application_name'] + '-taker'
    try:
        assert peer.do('borrow', 'db2') == backend      # named by the peer (committed)
        peer.do('back', 'db2')
        assert server_name(pg, backend) == info()['application_name'] + '-peer'
        cnx = pool.borrow(info('db2', application_name=taker))
        assert backend_pid(cnx) == backend
        cnx.rollback()
        with cnx.cursor() as cur:
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute('SELECT 1/0')
        cnx.commit()
        pool.give_back(cnx)
        again = pool.borrow(info('db2', application_name=taker))
        assert again is cnx
        with again.cursor() as cur:
            cur.execute('SELECT 1')
        again.commit()
        name_now = server_name(pg, backend)
        thread, outcome = run_sleep(again)
        time.sleep(0.5)
        again.cancel()
        thread.join(5.0)
        stuck = thread.is_alive()
        if stuck:
            pg.sql('SELECT pg_cancel_backend(%s)', [backend])
            thread.join(5.0)
        again.rollback()
        pool.give_back(again)
        assert (name_now, stuck) == (taker, False), \
            f'server name {name_now!r} (wanted {taker!r}); cancel() missed: {stuck}'
    finally:
        peer.stop()
        stop(donor)
        pool.shutdown()


def test_a_statement_that_fails_before_it_is_sent_does_not_count_the_name(
        pg, info, tmp_path):
    """psycopg2 formats the parameters before it sends BEGIN: an execute() that raises
    there sent nothing, yet pooled.name_tx is set; a commit() then (nothing to commit: no
    round trip) counts a name the server never saw."""
    taker = info()['application_name'] + '-taker'
    with taken('exchange', str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        donor_name = server_name(pg, backend)
        with cnx.cursor() as cur:
            with pytest.raises((IndexError, TypeError)):
                cur.execute('SELECT %s, %s', (1,))      # not enough parameters
        cnx.commit()
        assert server_name(pg, backend) == donor_name
        assert cnx.pooled.app == donor_name and cnx.pooled.name == taker, \
            (cnx.pooled.app, cnx.pooled.name)


def test_a_rollback_by_psycopg2_itself_does_not_leave_the_name_counted_later(
        pg, info, tmp_path):
    """set_isolation_level() inside a transaction rolls it back in C (not through our
    rollback()): pooled.name_tx stays set, and the next transaction, which does not carry
    the SET (its first statement is a SET LOCAL), counts the name at its commit."""
    with taken('exchange', str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        donor_name = server_name(pg, backend)
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')                     # carries the SET
        cnx.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        assert server_name(pg, backend) == donor_name   # rolled back
        with cnx.cursor() as cur:
            cur.execute("SET LOCAL work_mem = '8MB'")   # (a SET: no prefix)
            cur.execute('SELECT 1')
        cnx.commit()
        assert server_name(pg, backend) == donor_name
        assert cnx.pooled.app == donor_name, (cnx.pooled.app, cnx.pooled.name)


@pytest.mark.parametrize('name', ['odoo%', "50%-o'dd\\y", 'x%s'])
def test_a_name_with_a_percent_sign_does_not_break_a_statement_with_parameters(
        pg, info, tmp_path, name):
    """An administrator's name (ODOO_PGAPPNAME, db_app_name, PGAPPNAME are kept as they
    are) goes in front of the user's query; psycopg2 then reads its % as placeholders
    when the query has parameters."""
    with taken('exchange', str(tmp_path / 'segment'), info, name) as (pool, cnx, backend):
        assert backend_pid(cnx) == backend and cnx.pooled.name == name
        cnx.rollback()
        with cnx.cursor() as cur:
            cur.execute('SELECT %s::int + 1', (41,))
            assert cur.fetchone()[0] == 42
        cnx.commit()
        assert server_name(pg, backend) == name
        pool.give_back(cnx)


def test_after_the_name_counts_later_transactions_do_not_send_it_again(pg, info, tmp_path):
    """Once a commit counted the name, the rest of the borrow no longer sends SET
    application_name with the first statement of its transactions (the prefix,
    computed at borrow, loses it)."""
    with taken('exchange', str(tmp_path / 'segment'), info) as (pool, cnx, backend):
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')
        cnx.commit()
        assert cnx.pooled.name is None
        with cnx.cursor() as cur:
            cur.execute('SELECT 2')
            sent = cur.query.decode()
        cnx.commit()
        pool.give_back(cnx)
        assert 'application_name' not in sent, sent


@pytest.mark.parametrize('name', ["o'dd\\y", 'a"b'])
def test_a_name_with_quotes_or_backslashes_is_set_as_is(pg, info, tmp_path, name):
    """Control: quotes and backslashes in the name are quoted safely (no % here)."""
    with taken('exchange', str(tmp_path / 'segment'), info, name) as (pool, cnx, backend):
        assert backend_pid(cnx) == backend
        cnx.commit()
        assert server_name(pg, backend) == name
        pool.give_back(cnx)


def test_the_quoted_name_is_not_reused_for_a_database_with_other_quoting(
        pg, info, tmp_path):
    """_name_sqls caches the quoted name per pool, quoted for the first connection that
    needed it (standard_conforming_strings on: quotes doubled, backslashes as they are);
    on a database where standard_conforming_strings is off that text means something
    else: the name's backslash escapes a quote and the rest of the name runs as SQL.
    (The old code quoted it for each connection.)"""
    if not pg.sql("SELECT 1 FROM pg_database WHERE datname = 'dbscs'"):
        pg.create_database('dbscs')
        pg.sql('GRANT ALL ON SCHEMA public TO odoo', dbname='dbscs')
        pg.sql('ALTER DATABASE dbscs SET standard_conforming_strings = off')
    pg.sql('DROP TABLE IF EXISTS pwned', dbname='dbscs')
    name = "x\\'; CREATE TABLE pwned(); --"
    path = str(tmp_path / 'segment')
    donor1, backend1 = start_donor(path, info('db1'))
    donor2, backend2 = start_donor(path, info('dbscs'))
    pool = make_pool(path)
    try:
        cnx = pool.borrow(info('db1', application_name=name))   # quoted for db1 here
        assert backend_pid(cnx) == backend1
        cnx.commit()
        pool.give_back(cnx)
        cnx = pool.borrow(info('dbscs', application_name=name))
        assert cnx.pooled.dirty == 0 and cnx.pooled.name == name
        with cnx.cursor() as cur:
            cur.execute('SELECT 1')
            sent = cur.query.decode()
        cnx.commit()
        pool.give_back(cnx)
        print(sent)
        assert not pg.sql("SELECT 1 FROM pg_tables WHERE tablename = 'pwned'", dbname='dbscs'), \
            'the name ran as SQL'
    finally:
        stop(donor1)
        stop(donor2)
        pool.shutdown()


# ------------------------------------------------------------------ deferred parking
from odoo_pool_patch import faults                                         # noqa: E402


def exchange_counts(pool):
    """This process's published (idle, in use) per key hash."""
    return {k: tuple(v) for k, v in pool.budget.exchange._counts.items() if v != [0, 0]}


def settled(pool, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool.books.finish_exits()
        if pool.books.closing == 0:
            break
        time.sleep(0.05)
    with pool.books.lock:
        return {'count': pool.books.count(), 'idle': pool.books.n_idle, 'used': len(pool.books.used),
                'closing': pool.books.closing, 'opening': pool.books.opening}


def wanted_elsewhere(peers, tmp_path, info, make, database='db1'):
    other = peer(peers, tmp_path, info, make)
    other.do('borrow', database)        # another process needed it (then holds it)
    time.sleep(0.05)
    return other


def request(pool, info, databases=('db1',), body=None):
    """What the wrapper around Odoo's _serve_db does: the request's cursors, then
    its response (a string), all under deferred_parking."""
    with pool_sharing.deferred_parking():
        for database in databases:
            cnx = pool.borrow(info(database))
            cnx.commit()
            pool.give_back(cnx)
        if body:
            body()
        return 'response'


@pytest.mark.parametrize('action', ['raise', 'raise_base'])
def test_a_failure_while_parking_at_the_end_of_a_request_keeps_the_books(
        pg, info, tmp_path, family, action):
    """An exception inside park_wanted's park (after the request's work committed):
    the connection is back idle, the counts are exact."""
    start, peers = family
    shared, make, new_pool = start()
    other = wanted_elsewhere(peers, tmp_path, info, make)
    pool = new_pool()
    faults.arm({'parking.park.before_lock': action})
    try:
        request(pool, info)             # (raises, or logs: see the test below)
    except (faults.InjectedError, faults.InjectedInterrupt):
        pass
    finally:
        faults.disarm()
    assert settled(pool) == {'count': 1, 'idle': 1, 'used': 0, 'closing': 0, 'opening': 0}
    assert list(exchange_counts(pool).values()) == [(1, 0)]
    other.do('back', 'db1')


def test_an_error_while_parking_at_the_end_of_a_request_does_not_fail_the_request(
        pg, info, tmp_path, family):
    """park_wanted runs in the finally of deferred_parking, after the request committed:
    an ordinary error there (a bug, a shared-state failure) replaces the request's
    response with an exception (Odoo answers 500 for work that was committed), and the
    other pools of the request are not parked."""
    start, peers = family
    shared, make, new_pool = start()
    other = wanted_elsewhere(peers, tmp_path, info, make)
    pool = new_pool()
    faults.arm({'parking.park.before_lock': 'raise'})
    try:
        outcome = request(pool, info)
    except faults.InjectedError as exc:
        outcome = exc
    finally:
        faults.disarm()
    other.do('back', 'db1')
    assert outcome == 'response', f'the request failed after its work: {outcome!r}'


@pytest.mark.parametrize('what', ['close_all', 'shutdown', 'give_back'])
@pytest.mark.parametrize('goes', [True, False])
def test_park_wanted_with_another_thread_meanwhile(pg, info, tmp_path, family, what, goes):
    """While park_wanted's connection travels (out of IDLE, in _closing), another thread
    runs close_all / shutdown / a give_back; the park then succeeds or fails. The
    books end exact."""
    start, peers = family
    shared, make, new_pool = start()
    other = wanted_elsewhere(peers, tmp_path, info, make)
    pool = new_pool()
    second = []

    def meanwhile(_name):
        thread = threading.Thread(target={
            'close_all': pool.close_all, 'shutdown': pool.shutdown,
            'give_back': lambda: pool.give_back(second.pop())}[what])
        thread.start()
        thread.join()
        if not goes:
            raise OSError('queue full')     # (what a full queue raises: not sent)

    def body():
        if what == 'give_back':
            second.append(pool.borrow(info('db2')))     # held by "another thread"
            second[0].commit()
        faults.arm({'parking.park.before_lock': meanwhile})
    try:
        assert request(pool, info, body=body) == 'response'
    finally:
        faults.disarm()
    state = settled(pool)
    if what == 'give_back':
        expected_idle = (0 if goes else 1) + 1      # db2 (nobody wants it) stays idle
    else:
        expected_idle = 0
    assert state == {'count': expected_idle, 'idle': expected_idle, 'used': 0,
                     'closing': 0, 'opening': 0}, state
    assert sum(v[0] for v in exchange_counts(pool).values()) == expected_idle
    assert sum(v[1] for v in exchange_counts(pool).values()) == 0
    other.do('back', 'db1')


@pytest.mark.odoo
def test_deferred_parking_is_installed_with_replica_routing_on_16_17():
    """odoo_install: install_replicas (16/17 with replicas: patch_readonly_methods
    wraps Request._serve_db, marked db_pooling) runs before
    _defer_parking_in_requests, which skips a _serve_db marked db_pooling."""
    import subprocess
    trees = [tree for tree in ODOO_TREES if tree.major in (16, 17)]
    if not trees:
        pytest.skip(f'no Odoo 16 or 17 tree among those found ({NO_ODOO or ODOO_TREES})')
    tree, venv = trees[0].path, trees[0].python
    script = '''
from odoo import http
from odoo_pool_patch.odoo_glue import replica_routes, odoo_install
from odoo_pool_patch.pool.sharing import parking_deferred
http.Request._serve_db = lambda self: parking_deferred()
replica_routes.patch_readonly_methods(['read'], None)   # install_replicas, 16/17
odoo_install._defer_parking_in_requests()               # then install()
class R:
    path = '/web/dataset/call_kw'
    def get_data(self, as_text=True): return '{"params": {"method": "search"}}'
req = http.Request.__new__(http.Request)
req.httprequest = R()
print(http.Request._serve_db(req))
'''
    out = subprocess.run([venv, '-c', script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=f'{ROOT}:{tree}'))
    assert out.stdout.strip().splitlines()[-1:] == ['True'], out.stdout + out.stderr


def test_a_donor_of_the_previous_version_does_not_fail_the_borrow(pg, info, tmp_path):
    """025cf9d changed the hand-over (the request no longer carries the taker's name,
    the bookkeeping has a new required 'app0') without bumping shared_state.VERSION
    ("bump on any layout or protocol change"): processes of both versions still share
    a state file (two containers on one host during a rolling upgrade), and a taker of
    the new version fails its borrow with KeyError on an older donor's bookkeeping."""
    original = exchange.session_meta

    def old_session_meta(cnx, app=''):      # what 92a643d sent
        meta = original(cnx)
        del meta['app0']
        return meta
    exchange.session_meta = old_session_meta
    try:
        donor, backend = start_donor(str(tmp_path / 'segment'), info('db2'))
    finally:
        exchange.session_meta = original
    pool = make_pool(str(tmp_path / 'segment'))
    try:
        cnx = pool.borrow(info('db2', application_name=info()['application_name'] + '-t'))
        cnx.rollback()
        pool.give_back(cnx)
    finally:
        stop(donor)
        pool.shutdown()
