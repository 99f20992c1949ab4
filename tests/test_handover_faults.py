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
from odoo_pool_patch import shared_state as ss
from odoo_pool_patch.budget import SharedBudget
from odoo_pool_patch.exchange import IdleExchange
from odoo_pool_patch.options import Settings
from odoo_pool_patch.pool import ConnectionPool

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

    def start(parking):
        shared = made['shared'] = SharedBudget(ss.SharedState(str(tmp_path / 'state')), 4,
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
