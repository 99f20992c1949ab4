"""A server session never has two owners: the hand-over between processes (exchange,
parking, budget) with faults injected at every step (odoo_pool_patch.faults), real
forked processes, real PostgreSQL, SIGKILL.

For every fault point and every action (a delay past the donor's patience, an
Exception, a BaseException as Odoo's SIGXCPU handler raises, SIGKILL), one
hand-over runs with the fault armed in the process that reaches that point; then
the other process borrows the same database and must get another backend than
the one the first holds (one owner), and once the survivors closed their
connections, nothing is left: no budget slot (shared state), no server session
(pg_stat_activity), no socket descriptor (/proc/<pid>/fd), within 5 s.
"""
import json
import os
import signal
import time

import pytest

from odoo_pool_patch import faults
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.shared.exchange import IdleExchange
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool

LATE = 0.7      # seconds: past the donor's ACK_TIMEOUT (0.5)


class Worker:
    """A forked process of the instance with its own pool, driven by JSON commands:
    ``borrow db`` (keeps it; its backend pid), ``back db``, ``close db`` (given back to
    be closed), ``closeall``, ``arm {point: action}``, ``stat name``, ``sockets``
    (socket descriptors it holds). An answer is ``[ok, value]``; None: it died."""
    _test_ends = []

    def __init__(self, shared, info, name):
        commands, self._commands = os.pipe()
        self._answers, answers = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                   # pragma: no cover - child
            try:
                for fd in [self._commands, self._answers] + Worker._test_ends:
                    os.close(fd)
                self._serve(shared, info, name, commands, answers)
            finally:
                os._exit(0)
        os.close(commands)
        os.close(answers)
        self._reader = os.fdopen(self._answers)
        Worker._test_ends += [self._commands, self._answers]
        self.alive = True

    @staticmethod
    def _serve(shared, info, name, commands, answers):     # pragma: no cover - child
        pool = ConnectionPool(4, settings=Settings(wait_timeout=10), budget=shared,
                              timer_period=0.1)
        held = {}
        with os.fdopen(commands) as lines:
            for line in lines:
                verb, argument = json.loads(line)
                try:
                    value = None
                    if verb == 'borrow':
                        cnx = held[argument] = pool.borrow(info(argument, application_name=name))
                        with cnx.cursor() as cur:
                            cur.execute('SELECT pg_backend_pid()')
                            value = cur.fetchone()[0]
                        cnx.commit()
                    elif verb in ('back', 'close'):
                        pool.give_back(held.pop(argument), keep_in_pool=verb == 'back')
                    elif verb == 'begin':       # a transaction left open: its start
                        cnx = held.get(argument) or pool.borrow(info(argument,
                                                                     application_name=name))
                        held[argument] = cnx
                        cur = held['cursor'] = cnx.cursor()
                        cur.execute('SELECT clock_timestamp()')
                        held['started'] = cur.fetchone()[0]
                    elif verb == 'end':         # ... recorded, committed, given back
                        cur = held.pop('cursor')
                        cur.execute('INSERT INTO dbp_owner_log VALUES (%s, pg_backend_pid(), '
                                    '%s, clock_timestamp())', (os.getpid(), held.pop('started')))
                        cur.connection.commit()
                        pool.give_back(held.pop(argument))
                    elif verb == 'closeall':
                        for cnx in held.values():
                            pool.give_back(cnx, keep_in_pool=False)
                        held.clear()
                        pool.close_all()
                    elif verb == 'arm':
                        faults.arm(argument) if argument else faults.disarm()
                    elif verb == 'stat':
                        value = getattr(pool.stats, argument)
                    elif verb == 'sockets':
                        value = sockets(os.getpid())
                    answer = [True, value]
                except BaseException as exc:        # noqa: BLE001 - reported
                    answer = [False, f'{type(exc).__name__}: {exc}']
                os.write(answers, (json.dumps(answer) + '\n').encode())

    def do(self, verb, argument=None):
        if not self.alive:
            return None
        try:
            os.write(self._commands, (json.dumps([verb, argument]) + '\n').encode())
        except BrokenPipeError:
            self.alive = False
            return None
        line = self._reader.readline()
        if not line:
            self.alive = False      # killed by its fault
            return None
        return json.loads(line)

    def value(self, verb, argument=None):
        answer = self.do(verb, argument)
        assert answer is not None and answer[0], answer
        return answer[1]

    def stop(self):
        if self._commands not in Worker._test_ends:
            return
        Worker._test_ends.remove(self._commands)
        Worker._test_ends.remove(self._answers)
        os.close(self._commands)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._reader.close()


def sockets(pid):
    """Socket descriptors of process ``pid``."""
    count = 0
    for name in os.listdir(f'/proc/{pid}/fd'):
        try:
            count += os.readlink(f'/proc/{pid}/fd/{name}').startswith('socket:')
        except OSError:
            pass
    return count


def quiet_sockets(pid):
    """Socket descriptors of ``pid`` once the watchers of closed backends are gone."""
    last, deadline = sockets(pid), time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = sockets(pid)
        if now == last:
            return now
        last = now
    return last


@pytest.fixture
def instance(tmp_path, info, app):
    """start(parking) -> (budget, worker factory): a master's budget and exchange (with
    or without parking queues) and workers forked from it; all ended after."""
    made = {'workers': []}

    def start(parking, budget=4):
        shared = made['shared'] = SharedBudget(ss.SharedState(str(tmp_path / 'state')), budget,
                                               role='master')
        shared.exchange = IdleExchange(shared)
        if not parking:
            shared.exchange.close()

        def worker(name):
            made['workers'].append(Worker(shared, info, f'{app}-{name}'))
            return made['workers'][-1]
        return shared, worker
    yield start
    faults.disarm()
    for worker in made['workers']:
        if worker.alive:
            os.kill(worker.pid, signal.SIGKILL)
        worker.stop()
    if 'shared' in made:
        made['shared'].exchange.close()


ACTIONS = {'delay': ('delay', LATE), 'raise': 'raise', 'raise_base': 'raise_base',
           'kill': 'kill'}
# point -> (scenario, the process that reaches it, other points to arm with it there)
POINTS = {
    'exchange.taker.after_receive': ('exchange', 'taker', {}),
    'exchange.taker.after_wrap': ('exchange', 'taker', {}),
    'exchange.taker.after_take_slot': ('exchange', 'taker', {}),
    'exchange.taker.after_ack': ('exchange', 'taker', {}),
    'budget.take_slot.locked': ('exchange', 'taker', {}),
    'exchange.donor.after_lend': ('exchange', 'donor', {}),
    'exchange.donor.after_promise': ('exchange', 'donor', {}),
    'exchange.donor.after_send': ('exchange', 'donor', {}),
    'exchange.donor.before_settle': ('exchange', 'donor', {}),
    # settled under the lock only without an acknowledgement: the taker is late
    'budget.settle.locked': ('exchange', 'donor', {'exchange.taker.after_wrap': ('delay', LATE)}),
    'parking.park.before_lock': ('parking', 'donor', {}),
    'parking.park.after_send': ('parking', 'donor', {}),
    'parking.park.after_lock': ('parking', 'donor', {}),
    'parking.receive.after_receive': ('parking', 'taker', {}),
    'parking.receive.after_wrap': ('parking', 'taker', {}),
}


def test_every_fault_point_is_listed_and_tested():
    assert set(POINTS) == set(faults.POINTS)
    with pytest.raises(ValueError, match='unknown fault points'):
        faults.arm({'exchange.taker.typo': 'kill'})


@pytest.mark.parametrize('action', list(ACTIONS))
@pytest.mark.parametrize('point', list(POINTS))
def test_a_fault_at_each_step_leaves_one_owner_and_nothing_leaked(
        pg, app, instance, point, action):
    scenario, where, also = POINTS[point]
    shared, worker = instance(parking=scenario == 'parking')
    donor, taker = worker('donor'), worker('taker')
    # Their listeners and shells exist from now on (each its own database: nothing parked).
    for each, database in ((donor, 'db3'), (taker, 'db1')):
        each.value('borrow', database)
        each.value('back', database)
        each.value('closeall')
    assert pg.wait_until(lambda: pg.count_connections(app + '%') == 0, 5)
    baseline = {each.pid: quiet_sockets(each.pid) for each in (donor, taker)}
    donor.value('borrow', 'db2')
    if scenario == 'parking':
        taker.value('borrow', 'db2')        # the taker needed db2 too: the donor will park
        taker.value('close', 'db2')
    armed = {point: ACTIONS[action]}
    targets = {'donor': donor, 'taker': taker}
    for name, process in targets.items():
        plan = {**armed} if name == where else {}
        plan.update({p: a for p, a in also.items() if POINTS[p][1] == name})
        process.value('arm', plan)
    donor.value('back', 'db2') if scenario == 'exchange' else donor.do('back', 'db2')
    got = taker.do('borrow', 'db2')
    for process in (donor, taker):
        process.do('arm', {})
    # One owner: a session the taker holds is never the donor's too.
    taker_backend = got[1] if got and got[0] else None
    if donor.alive:
        mine = donor.value('borrow', 'db2')
        assert mine != taker_backend, (point, action, got)
    if action in ('delay', 'kill') or POINTS[point][1] == 'donor':
        assert got is None or got[0], got   # a delay or the donor's fault: still served
    if taker.alive and taker_backend is None and got is not None:
        assert 'Injected' in got[1], got
    # Nothing leaked once the survivors closed theirs.
    for process in (donor, taker):
        process.do('closeall')
    state = shared.state

    def settled():
        state.reap(force=True)
        return state.total_held() == 0 and pg.count_connections(app + '%') == 0 and all(
            sockets(p.pid) <= baseline[p.pid] for p in (donor, taker) if p.alive)
    assert pg.wait_until(settled, 5), (
        point, action, state.total_held(), pg.count_connections(app + '%'),
        {p.pid: (sockets(p.pid), baseline[p.pid]) for p in (donor, taker) if p.alive},
        state.processes())


# ------------------------------------------------------------------ the ownership invariant
@pytest.fixture
def owner_log(pg):
    """A table in each database where every transaction records (OS pid, backend pid,
    server time at its first and last statement)."""
    for database in ('db1', 'db2', 'db3'):
        pg.sql('CREATE TABLE IF NOT EXISTS dbp_owner_log (os_pid int, backend int, '
               'started timestamptz, ended timestamptz)', dbname=database)
        pg.sql('TRUNCATE dbp_owner_log', dbname=database)
    return pg


def logged_transaction(pool, connection_info):
    """One short transaction recording its interval; the backend pid."""
    cnx = pool.borrow(connection_info)
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT clock_timestamp()')
            started = cur.fetchone()[0]
            cur.execute('INSERT INTO dbp_owner_log VALUES (%s, pg_backend_pid(), %s, '
                        'clock_timestamp()) RETURNING backend', (os.getpid(), started))
            backend = cur.fetchone()[0]
        cnx.commit()
    except BaseException:
        pool.give_back(cnx, keep_in_pool=False)
        raise
    pool.give_back(cnx)
    return backend


def overlaps(pg):
    """Pairs of transactions of different OS processes on one backend at the same time
    (two owners of one session), in every database."""
    found = 0
    for database in ('db1', 'db2', 'db3'):
        found += pg.sql('SELECT count(*) FROM dbp_owner_log a JOIN dbp_owner_log b ON '
                        'a.backend = b.backend AND a.os_pid < b.os_pid AND '
                        'a.started < b.ended AND b.started < a.ended', dbname=database)[0][0]
    return found


def logged(pg):
    return sum(pg.sql('SELECT count(*) FROM dbp_owner_log', dbname=database)[0][0]
               for database in ('db1', 'db2', 'db3'))


def _old_protocol(monkeypatch):
    """The hand-over as it was: the taker took unless the token read -serial (the
    donor's give-up of that very request), writing +serial; no promise."""
    def take_slot(self, row, pid, serial, claim=None):
        with self.state.locked() as cells:
            base = ss.PROC_BASE + row * ss.P_FIELDS
            if cells[base + ss.P_PID] == pid:
                if cells[base + ss.P_GIVEN] == -serial:
                    return False
                cells[base + ss.P_HELD] = max(cells[base + ss.P_HELD] - 1, 0)
                cells[base + ss.P_GIVEN] = serial
            cells[ss.PROC_BASE + self.row * ss.P_FIELDS + ss.P_HELD] += 1
            if claim is not None:
                claim[2] = True
            return True

    def settle(self, serial):
        with self.state.locked() as cells:
            given = ss.PROC_BASE + self.row * ss.P_FIELDS + ss.P_GIVEN
            if cells[given] == serial:
                return True
            cells[given] = -serial
            return False
    monkeypatch.setattr(SharedBudget, 'promise', lambda self, serial: None)
    monkeypatch.setattr(SharedBudget, 'take_slot', take_slot)
    monkeypatch.setattr(SharedBudget, 'settle', settle)


class _Background:
    """``worker.do(...)`` in a thread (it blocks until the worker answers)."""

    def __init__(self, worker, *command):
        import threading
        self.answer = None
        self.thread = threading.Thread(target=self._run, args=(worker, command))
        self.thread.start()

    def _run(self, worker, command):
        self.answer = worker.do(*command)

    def result(self):
        self.thread.join(30)
        return self.answer


@pytest.mark.parametrize('protocol', ['fenced', 'old'])
def test_a_late_taker_never_drives_a_session_the_donor_handed_on(
        owner_log, app, instance, monkeypatch, protocol):
    """Taker a receives the donor's descriptor, then stalls 1.5 s before taking the slot
    (a GC pause, a starved container, a local user squatting the stand-in's name): the
    donor gives up waiting at 0.5 s, keeps the session and hands it to taker b. When a
    wakes up it must give up. With the old protocol (control) a took it anyway: a and b
    both hold one backend at once."""
    if protocol == 'old':
        _old_protocol(monkeypatch)
    shared, worker = instance(parking=False)
    donor, late, other = worker('donor'), worker('late'), worker('other')
    backend = donor.value('borrow', 'db2')
    donor.value('back', 'db2')
    late.value('arm', {'exchange.taker.after_wrap': ('delay', 1.5)})
    stalled = _Background(late, 'borrow', 'db2')
    time.sleep(0.9)                                 # the donor gave up on a at 0.5 s
    assert other.value('borrow', 'db2') == backend  # and handed the session to b
    late_backend = stalled.result()[1]
    if protocol == 'fenced':
        assert late_backend != backend
        assert (late.value('stat', 'taken'), late.value('stat', 'opened')) == (0, 1)
        assert overlaps(owner_log) == 0
        return
    assert late_backend == backend                  # two owners of one backend


@pytest.mark.parametrize('protocol', ['locked_send', 'old'])
def test_a_stalled_parker_is_never_healed_away(pg, app, instance, monkeypatch, protocol):
    """A parker stalls (0.6 s) while another process runs two maintenance passes, which
    free the count of a lot counted but empty and unchanged (a crash's leftover). The
    send now happens inside the locked step that counts it, so a stall anywhere leaves
    count and queue equal and the parked connection is received. Control, the old
    order (count, release the lock, then send): the passes heal the count to 0, the
    connection arrives in a queue nobody takes it from, and the instance holds one
    session more than its budget counts."""
    from odoo_pool_patch.shared.parking import Parking
    if protocol == 'old':
        send_fds = __import__('socket').send_fds

        def old_park(self, khash, fd, meta, sent=None):
            base = self._lot(khash).start
            lot = (base - ss.LOT_BASE) // ss.K_FIELDS
            data = __import__('marshal').dumps((khash, self.budget.pid, time.monotonic(), meta))
            with self.state.locked() as cells:
                cells[ss.PROC_BASE + self.budget.row * ss.P_FIELDS + ss.P_HELD] -= 1
                cells[base + ss.K_COUNT] += 1
                cells[base + ss.K_SEQ] += 1
                cells[ss.H_PARKED] += 1
            time.sleep(0.6)                         # the stall between the two steps
            send_fds(self._pairs[lot][1], [data], [fd])
            sent[0] = True
            return True
        monkeypatch.setattr(Parking, 'park', old_park)
    shared, worker = instance(parking=True)
    parker, receiver = worker('parker'), worker('receiver')
    backend = parker.value('borrow', 'db2')
    receiver.value('borrow', 'db2')                 # db2 is wanted elsewhere: it will park
    receiver.value('close', 'db2')
    if protocol == 'locked_send':
        parker.value('arm', {'parking.park.after_send': ('delay', 0.6)})
    parking = _Background(parker, 'back', 'db2')
    time.sleep(0.15)
    for _ in range(2):                              # two maintenance passes meanwhile
        shared.exchange.parking.tick(True, 600)
        time.sleep(0.15)
    assert parking.result() == [True, None]
    got = receiver.value('borrow', 'db2')
    if protocol == 'locked_send':
        assert got == backend and receiver.value('stat', 'unparked') == 1
        assert shared.state.cells[ss.H_PARKED] == 0
        return
    assert got != backend and receiver.value('stat', 'unparked') == 0   # stranded
    assert shared.state.cells[ss.H_PARKED] == 0
    assert pg.count_connections(app + '%') > shared.state.total_held()  # over the budget


def client_logged_transaction(pool, connection_info, log):
    """:func:`logged_transaction`, also written down by the client whatever happens
    (``os pid, backend, start, end`` in wall-clock time, one line as soon as the backend
    is known and one when done): a transaction two owners mix up may fail before it
    commits anything, but it did run on that backend during that time."""
    cnx = pool.borrow(connection_info)
    started, backend = time.time(), None
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_backend_pid(), clock_timestamp()')
            backend, server_start = cur.fetchone()
            os.write(log, f'{os.getpid()} {backend} {started} open\n'.encode())
            cur.execute('INSERT INTO dbp_owner_log VALUES (%s, pg_backend_pid(), %s, '
                        'clock_timestamp())', (os.getpid(), server_start))
        cnx.commit()
    except BaseException:
        if backend is not None:
            os.write(log, f'{os.getpid()} {backend} {started} {time.time()}\n'.encode())
        pool.give_back(cnx, keep_in_pool=False)
        raise
    os.write(log, f'{os.getpid()} {backend} {started} {time.time()}\n'.encode())
    pool.give_back(cnx)


def client_overlaps(paths, killed_at):
    """Pairs of transactions of two OS processes on one backend at once, from the
    clients' logs (a transaction whose process was killed counts as open until then:
    ``killed_at`` {pid: wall-clock time})."""
    spans, opened = {}, {}
    for path in paths:
        with open(path) as lines:
            for line in lines:
                pid, backend, start, end = line.split()
                if end == 'open':
                    opened[(pid, backend, start)] = True
                    continue
                opened.pop((pid, backend, start), None)
                spans.setdefault(backend, []).append((float(start), float(end), pid))
    for pid, backend, start in opened:      # killed mid-transaction: open until then
        spans.setdefault(backend, []).append((float(start), killed_at[int(pid)], pid))
    found = 0
    for intervals in spans.values():
        intervals.sort()
        for index, (start, end, pid) in enumerate(intervals):
            for other_start, _other_end, other_pid in intervals[index + 1:]:
                if other_start >= end:
                    break
                found += other_pid != pid
    return found


def _churn(shared, info, name, stop_path, seed, late):       # pragma: no cover - child
    """A worker: short logged transactions on random databases until ``stop_path``
    exists, with random delays at every fault point (now and then a late taker)."""
    import random
    rng = random.Random(seed)
    log = os.open(f'{stop_path}.{os.getpid()}.log', os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def jitter(point):
        if point == 'exchange.taker.after_wrap' and rng.random() < late:
            time.sleep(0.6)                         # past the donor's patience
        elif rng.random() < 0.2:
            time.sleep(rng.random() * 0.002)
    faults.arm({point: jitter for point in faults.POINTS})
    pool = ConnectionPool(3, settings=Settings(wait_timeout=30), budget=shared,
                          timer_period=0.1)
    infos = [info(database, application_name=name) for database in ('db1', 'db2', 'db3')]
    while not os.path.exists(stop_path):
        try:
            client_logged_transaction(pool, rng.choice(infos), log)
        except Exception:       # noqa: BLE001 - a backend of a killed peer: go on
            time.sleep(0.01)


@pytest.mark.soak
@pytest.mark.parametrize('way, target', [('parked', 10_000), ('taken', 4_000)])
def test_one_owner_per_session_over_ten_thousand_hand_overs(
        owner_log, info, app, tmp_path, instance, way, target):
    """8 workers on a budget of 10 for 3 databases (less than the 24 connections they
    would hold each on its own, so most transactions get their connection from another
    worker: parked, or, without parking, taken from its donor), random delays at every fault
    point with late takers now and then, and a worker SIGKILLed every 0.4 s (taker,
    donor or parker, whatever it was doing) and replaced, until 10,000 hand-overs
    parked and 4,000 taken: no two processes ever ran a transaction on one backend at
    the same time (by the server's clock for committed transactions, and by the
    clients' for every transaction that reached its first statement, killed ones
    included), and nothing is left once they are gone. The two owners the old protocol
    gave a late taker are shown by the control of
    test_a_late_taker_never_drives_a_session_the_donor_handed_on; under this random
    load its window (a second take within the stall) is too rare for this run to catch
    it: this test guards the new protocol, not a proof it would fail on the old one."""
    import random
    shared, _worker = instance(parking=way == 'parked', budget=10)
    stop_path = str(tmp_path / 'stop')
    rng = random.Random(1234)
    children = {}

    def spawn(number):
        pid = os.fork()
        if pid == 0:                                # pragma: no cover - child
            try:
                _churn(shared, info, f'{app}-w{number}', stop_path, number, 0.002)
            finally:
                os._exit(0)
        children[pid] = number

    def hand_overs():
        totals = shared.state.counter_totals()
        return sum(role['taken'] + role['unparked'] for role in totals.values())
    for number in range(8):
        spawn(number)
    killed, started, killed_at = 0, time.monotonic(), {}
    try:
        while hand_overs() < target:
            assert time.monotonic() - started < 300, f'only {hand_overs()} hand-overs'
            time.sleep(0.4)
            victim = rng.choice(list(children))
            killed_at[victim] = time.time()
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
            killed += 1
            spawn(len(children) + killed + 100)
            del children[victim]
    finally:
        open(stop_path, 'w').close()
        for pid in children:
            os.waitpid(pid, 0)
    done = hand_overs()
    assert done >= target and killed > 10 and logged(owner_log) > done / 2
    assert overlaps(owner_log) == 0
    import glob
    assert client_overlaps(glob.glob(stop_path + '.*.log'), killed_at) == 0
    state = shared.state

    def settled():
        state.reap(force=True)
        if way == 'parked':
            shared.exchange.parking.tick(True, 0.001)   # what is parked idles out
        return state.total_held() == 0 and pg_idle(owner_log, app) == 0
    assert owner_log.wait_until(settled, 10), (state.total_held(), state.processes())


def pg_idle(pg, app):
    return pg.count_connections(app + '%')


def test_an_interrupt_as_the_park_send_returns_leaves_one_owner(
        pg, app, info, instance, monkeypatch):
    """A signal handler raising as the send of a parked connection returns (the session
    is in the queue): the parker must count it parked and never use it again; the
    exception reaches its caller. (Counting it "not sent" put it back under the parker's
    libpq while another process received it: two owners.)"""
    import socket as socket_module
    shared, worker = instance(parking=True)
    receiver = worker('receiver')
    pool = ConnectionPool(4, settings=Settings(), budget=shared, timer_period=0.1)
    try:
        cnx = pool.borrow(info('db2', application_name=f'{app}-parker'))
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_backend_pid()')
            backend = cur.fetchone()[0]
        cnx.commit()
        receiver.value('borrow', 'db2')             # db2 is wanted elsewhere: it will park
        receiver.value('close', 'db2')
        send_fds = socket_module.send_fds

        def interrupted(*args):
            send_fds(*args)
            raise faults.InjectedInterrupt('a signal handler, as the send returned')
        monkeypatch.setattr(socket_module, 'send_fds', interrupted)
        with pytest.raises(faults.InjectedInterrupt):
            pool.give_back(cnx)
        monkeypatch.setattr(socket_module, 'send_fds', send_fds)
        assert pool.stats.parked == 1 and shared.state.cells[ss.H_PARKED] == 1
        assert receiver.value('borrow', 'db2') == backend           # received
        again = pool.borrow(info('db2', application_name=f'{app}-parker'))
        with again.cursor() as cur:
            cur.execute('SELECT pg_backend_pid()')
            assert cur.fetchone()[0] != backend                     # never ours again
        again.commit()
        pool.give_back(again)
    finally:
        pool.shutdown()
