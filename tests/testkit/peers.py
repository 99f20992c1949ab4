"""Peers: forked processes with their own pool on one shared segment, driven by the test
one command at a time, and the set-ups several test modules share (a donor's idle
connection, a worker's parked one, a connection taken from another process)."""
import contextlib
import os
import signal
import threading
import traceback

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.shared.exchange import IdleExchange
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool

from testkit import backend_pid


def make_pool(path, exchange=True, budget=4):
    shared = SharedBudget(ss.SharedState(path), budget, role='http')
    if exchange:
        shared.exchange = IdleExchange(shared)
    return ConnectionPool(4, settings=Settings(), budget=shared)


def donor(path, connection_info, ready, dirty=False):
    """A child that leaves one idle connection in its pool, says its backend pid on
    ``ready`` and waits for SIGTERM (then reports how many it gave and still holds)."""
    pid = os.fork()
    if pid:
        return pid
    try:                                    # pragma: no cover - child
        pool = make_pool(path)
        cnx = pool.borrow(connection_info)
        number = backend_pid(cnx)
        if dirty:
            with cnx.cursor() as cur:
                cur.execute("SET work_mem = '8MB'")     # session state: never given away
        cnx.commit()
        pool.give_back(cnx)
        os.write(ready, str(number).encode())
        signal.sigwait({signal.SIGTERM})
        os._exit(0)
    finally:
        os._exit(1)


def start_donor(path, connection_info, dirty=False):
    read_end, write_end = os.pipe()
    pid = donor(path, connection_info, write_end, dirty)
    os.close(write_end)
    number = int(os.read(read_end, 32))
    os.close(read_end)
    return pid, number


def stop(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def held(state):
    return {row['pid']: row['held'] for row in state.processes()}


class Peer:
    """A forked process with its own pool on the segment ``path``, doing what the test
    says, one command at a time, under its own application_name (as Odoo names each
    process's connections): ``borrow db`` (keeps it; answers its backend pid),
    ``back db`` (gives it back), ``close db`` (gives it back to be closed), ``stat name``
    (answers that counter of its pool). ``pool``: makes its pool (run in the child)."""
    _test_ends = []         # the test process's ends of every running peer's pipes

    def __init__(self, path, info, budget=4, pool=None):
        commands, self._commands = os.pipe()
        self._answers, answers = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                   # pragma: no cover - child
            try:
                # Else our copies of the test's ends keep commands open (ours, other peers').
                for fd in [self._commands, self._answers] + Peer._test_ends:
                    os.close(fd)
                self._serve(path, info, budget, commands, answers, pool)
            except BaseException:   # the test sees an empty answer: say why here
                traceback.print_exc()
                os._exit(3)
            finally:
                os._exit(0)
        os.close(commands)
        os.close(answers)
        Peer._test_ends += [self._commands, self._answers]

    @staticmethod
    def _serve(path, info, budget, commands, answers, make):   # pragma: no cover - child
        pool, held = make() if make else make_pool(path, budget=budget), {}
        name = info()['application_name'] + '-peer'
        with os.fdopen(commands) as lines:
            for line in lines:
                verb, database = line.split()
                answer = 0
                if verb == 'borrow':
                    cnx = held[database] = pool.borrow(info(database, application_name=name))
                    answer = backend_pid(cnx)
                    cnx.commit()
                elif verb == 'stat':
                    answer = getattr(pool.stats, database)
                else:
                    pool.give_back(held.pop(database), keep_in_pool=verb == 'back')
                os.write(answers, f'{answer}\n'.encode())

    def do(self, verb, database):
        os.write(self._commands, f'{verb} {database}\n'.encode())
        answer = os.read(self._answers, 64)
        if not answer:      # the peer ended: say how (its traceback is in the captured stderr)
            _, status = os.waitpid(self.pid, 0)
            self._reaped = True
            raise AssertionError(
                f'peer {self.pid} ended without answering {verb!r} {database!r}: '
                f'exit status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}, '
                f'signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}')
        return int(answer)

    def stop(self, sig=None):
        """End the peer: its commands closed (it exits), or killed with ``sig``."""
        if self._commands not in Peer._test_ends:
            return
        if sig is not None and not getattr(self, '_reaped', False):
            os.kill(self.pid, sig)
        Peer._test_ends.remove(self._commands)
        Peer._test_ends.remove(self._answers)
        os.close(self._commands)
        if not getattr(self, '_reaped', False):
            os.waitpid(self.pid, 0)
        os.close(self._answers)


def borrow_while_peer_gives_back(pool, peer, info, delay):
    """The budget of 2 full (``peer`` holds db1 in use, ``pool`` an idle db2), ``pool``
    borrows db1 while the peer gives it back after ``delay`` s: (connection, the
    backend the peer held)."""
    busy = peer.do('borrow', 'db1')
    pool.give_back(pool.borrow(info('db2')))
    giver = threading.Timer(delay, peer.do, ('back', 'db1'))
    giver.start()
    cnx = pool.borrow(info('db1'))
    giver.join()
    return cnx, busy


def master(path, budget=4, min_idle=0):
    """The budget and exchange an Odoo master makes in post_load, before forking."""
    shared = SharedBudget(ss.SharedState(path), budget, min_idle=min_idle, role='master')
    shared.exchange = IdleExchange(shared)
    return shared


def pool_factory(shared, **settings):
    """A pool factory on ``shared`` (the test process's, and its forked peers')."""
    return lambda: ConnectionPool(4, settings=Settings(**settings), budget=shared,
                                  timer_period=0.1)


def parked(shared):
    return shared.state.cells[ss.H_PARKED]


def count(pg, app, database):
    return pg.count_connections(app + '%', database)


def peer(peers, tmp_path, info, make):
    peers.append(Peer(str(tmp_path / 'segment'), info, pool=make))
    return peers[-1]


def master_family(path):
    """The budget and exchange (with its parking) of a master, and its pool factory."""
    shared = SharedBudget(ss.SharedState(path), 4, role='master')
    shared.exchange = IdleExchange(shared)
    return shared, lambda: ConnectionPool(4, settings=Settings(), budget=shared, timer_period=0.1)


def parked_by_a_worker(path, info, peers):
    """Worker a parks its db2 connection (worker b needed db2 too): (pool factory,
    a's backend pid, master budget, connections a parked)."""
    shared, make = master_family(path)
    peers += [Peer(path, info, pool=make), Peer(path, info, pool=make)]
    backend = peers[0].do('borrow', 'db2')
    peers[1].do('borrow', 'db2')
    peers[0].do('back', 'db2')
    return make, backend, shared, peers[0].do('stat', 'parked')


@contextlib.contextmanager
def taken(source, path, info, name=None):
    """(pool, a db2 connection it took from another process, that one's backend pid);
    borrowed under ``name`` (default: the test's application_name + '-taker')."""
    peers, pools, donor, shared = [], [], None, None
    try:
        if source == 'exchange':
            donor, backend = start_donor(path, info('db2'))
            pools.append(make_pool(path))
        else:
            make, backend, shared, parked = parked_by_a_worker(path, info, peers)
            assert parked == 1
            pools.append(make())
        pool = pools[0]
        cnx = pool.borrow(info('db2', application_name=name or
                               info()['application_name'] + '-taker'))
        assert (pool.stats.taken, pool.stats.unparked, pool.stats.opened) == \
            ((1, 0, 0) if source == 'exchange' else (0, 1, 0))
        yield pool, cnx, backend
    finally:
        for peer in peers:
            peer.stop()
        if donor:
            stop(donor)
        for pool in pools:
            pool.shutdown()
        if shared is not None:
            shared.exchange.close()


def run_sleep(cnx):
    """SELECT pg_sleep(30) on ``cnx`` in a thread: (thread, [its exception or None])."""
    outcome = []

    def run():
        try:
            with cnx.cursor() as cur:
                cur.execute('SELECT pg_sleep(30)')
            outcome.append(None)
        except Exception as exc:            # noqa: BLE001
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def server_name(pg, backend):
    """application_name of backend ``backend`` as the server shows it."""
    return pg.sql('SELECT application_name FROM pg_stat_activity WHERE pid = %s',
                  [backend])[0][0]
