"""One connection budget for every process of an Odoo instance.

A libpq connection cannot move between processes, so the budget is shared,
not the connections: a process may open a server connection only after
taking a slot of the budget, and gives the slot back once the connection is
closed (and its backend has exited). Reusing a connection a process already
holds costs no shared-state access at all, so the hot path stays local.

When the budget is full, the borrower waits in a queue kept in shared memory
and served by priority, then first come first served:

    0  long-lived    connections to the ``postgres`` database (LISTEN for the bus
                     and cron wake-ups, database manager), so they never stall
    1  http          interactive requests (HTTP workers, threaded server)
    2  gevent        the websocket / longpolling process
    3  cron          scheduled jobs; ``cron_reserve`` slots are kept for them so a
                     busy instance never starves cron

A slot freed by any process is handed to the best waiter directly (its row is
marked granted), and every process closes its idle connections promptly while
someone waits (see ``Upkeep.shed_idle`` of the pool), so idle connections in one
worker never block a borrower in another.
"""
import os
import time
import weakref

from .. import after_fork
from .. import faults
from . import shared_state as ss

PRIORITIES = {'long': 0, 'http': 1, 'master': 1, 'threaded': 1, 'other': 1, 'gevent': 2, 'cron': 3}
CRON = PRIORITIES['cron']
_CRON_ROLE = ss.ROLES.index('cron')
# For the hot paths (borrow, give-back): the header's cells, the columns of every process
_WAITING, _PARKED = ss.Header.FIELDS['waiting'], ss.Header.FIELDS['parked']
_HELDS, _ROLES = ss.Process.columns('held'), ss.Process.columns('role')
LONG_LIVED_DATABASES = frozenset(('postgres', 'template0', 'template1'))


class SharedBudget:
    """This process's handle on the instance budget (one per process, shared by its pools).

    :param state: the attached :class:`~.shared_state.SharedState`.
    :param budget: most server connections the whole instance holds
        (``db_pool_max_connections``).
    :param cron_reserve: slots only cron may take when the rest is full.
    :param min_idle: idle connections the whole instance keeps past the idle timeout.
    :param role: this process's role (``http``, ``cron``, ``gevent``, ``master``,
        ``threaded``); forked children re-register as ``http`` until told otherwise.
    """
    poll_interval = 0.005

    def __init__(self, state, budget, cron_reserve=0, min_idle=0, role='other'):
        self.state = state
        self.budget = int(budget)
        self.cron_reserve = int(cron_reserve)
        self.min_idle = int(min_idle)
        self.role = role
        self._set_row(state.register(role))
        self.pid = os.getpid()
        self.exchange = None    # an exchange.IdleExchange with db_pool_shared_idle
        _budgets.add(self)
        header = state.header
        with state.locked():
            header.budget = self.budget
            header.cron_reserve = self.cron_reserve
            header.min_idle = self.min_idle

    # ------------------------------------------------------------------ identity
    def set_role(self, role):
        self.role = role
        self.state.set_role(self.row, role)

    def _set_row(self, row):
        """``row``: this process's row number; ``me`` its view. Borrow and give-back
        (thousands a second) write its slot count and counters by cell index, kept here,
        not through the view's fields."""
        self.row = row
        self.me = me = self.state.process(row)
        self._held = me.cell('held')
        self._counters = {name: me.counter(name) for name in ss.COUNTERS}

    def priority(self, database, thread_name=''):
        if database in LONG_LIVED_DATABASES:
            return PRIORITIES['long']
        if self.role == 'threaded' and thread_name.startswith('odoo.service.cron'):
            return CRON
        return PRIORITIES.get(self.role, 1)

    def after_fork_in_child(self, role='http'):
        self.state.after_fork_in_child()
        self.role = role
        self._set_row(self.state.register(role))
        self.pid = os.getpid()
        if self.exchange is not None:
            self.exchange.after_fork_in_child()

    # ------------------------------------------------------------------ slots
    def waiting(self):
        """How many borrowers wait instance-wide (a lock-free read)."""
        return self.state.header.waiting

    def has_room(self):
        """Whether a slot is free for a non-cron borrower (a lock-free estimate)."""
        return not self.state.header.waiting and \
            self.state.total_held() < self.budget - self.cron_reserve

    def held(self):
        return self.me.held

    def try_acquire(self, priority):
        """Take a slot if one is free and nobody waits; never blocks on the queue."""
        with self.state.locked() as cells:
            self.state.reap_shared_locked(cells)
            if cells[_WAITING] or not self._room_shared_locked(cells, priority):
                return False
            cells[self._held] += 1
            return True

    def acquire(self, priority, timeout, wake=None):
        """Take a slot, waiting in the shared queue up to ``timeout`` seconds. True if taken.

        ``wake``: a ``threading.Event`` another thread of this process sets when it
        serves this borrower itself (a connection handed over); the wait then ends
        without a slot (False), without counting a timeout."""
        deadline = time.monotonic() + timeout
        with self.state.locked() as cells:
            self.state.reap_shared_locked(cells)
            if not cells[_WAITING] and self._room_shared_locked(cells, priority):
                cells[self._held] += 1
                return True
            waiter = self._enqueue_shared_locked(cells, priority)
            self.count_shared_locked(cells, 'waits')
            self.grant_shared_locked(cells)
            bell = self.state.doorbell()
            if bell is not None:
                bell.bump()
        next_check = time.monotonic() + 0.25
        woken = interrupted = False
        try:
            if bell is not None:
                bell.wake()         # every process's maintenance sheds idle connections for us
            while waiter.state != ss.GRANTED:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_check:       # a dead holder's slots come back through reaping
                    next_check = now + 0.25
                    with self.state.locked() as locked_cells:
                        self.state.reap_shared_locked(locked_cells)
                        self.grant_shared_locked(locked_cells)
                pause = min(self.poll_interval, max(deadline - now, 0))
                if wake is None:
                    time.sleep(pause)
                elif wake.wait(pause):
                    woken = True
                    break
        except BaseException:       # gevent.Timeout, KeyboardInterrupt
            interrupted = True
            raise
        finally:
            with self.state.locked() as locked_cells:
                granted = waiter.state == ss.GRANTED
                if granted and interrupted:     # granted as it was interrupted: give it back
                    self._give_back_shared_locked(locked_cells, 1)
                    granted = False
                if not granted and waiter.state == ss.WAITING:
                    self.state.header.waiting -= 1
                waiter.clear()
                if not granted and not woken:
                    self.count_shared_locked(locked_cells, 'timeouts')
        return granted

    def reap(self):
        """Reclaim the slots of dead processes and hand them to waiters. Slots freed."""
        if int(time.monotonic() * 1000) - self.state.header.last_reap < 500:
            return 0                    # someone reaped recently: skip the lock
        with self.state.locked() as cells:
            freed = self.state.reap_shared_locked(cells)
            if self.state.header.waiting:
                self.grant_shared_locked(cells)
            return freed

    def release(self, count=1, shed=0):
        """Give back slots of connections this process closed (``shed`` of them
        claimed with :meth:`claim_shed`); wakes the best waiters."""
        with self.state.locked() as cells:
            if shed:
                self.me.shedding = max(self.me.shedding - shed, 0)
            self.count_shared_locked(cells, 'closed', count)
            self._give_back_shared_locked(cells, count)

    # The hand-over token (the donor row's ``given``; see the exchange module's protocol):
    # +s promised to request s, -s taken by its taker, 0 settled. Changed under the lock.
    def promise(self, serial):
        """Donor: the connection about to be sent is request ``serial``'s to take."""
        with self.state.locked():
            self.me.given = serial

    def take_slot(self, row, pid, serial, claim=None):
        """Taker: make ours the session process ``pid`` (its ``row``) sent for request
        ``serial``, with its slot, if the token still reads the promise (``+serial``);
        False if not (the donor settled first and keeps it). ``claim[2]`` is set inside
        the locked step (see ``IdleExchange.take``)."""
        with self.state.locked() as cells:
            if faults.plan:
                faults.hit('budget.take_slot.locked')
            donor = self.state.process(row)
            if donor.pid != pid or donor.given != serial:
                # Not promised to us (any more). A reaped donor's row says nothing: it may
                # have settled and handed the session on before it died.
                return False
            donor.held = max(donor.held - 1, 0)
            donor.given = -serial
            self.me.held += 1
            if claim is not None:
                claim[2] = True
            self.count_shared_locked(cells, 'taken')
            return True

    def settle(self, serial):
        """Donor, without an acknowledgement: whether the taker of request ``serial``
        took the session (token ``-serial``); if not, the token becomes 0 and it never
        will (see :meth:`take_slot`)."""
        with self.state.locked():
            if faults.plan:
                faults.hit('budget.settle.locked')
            if self.me.given == -serial:
                return True
            self.me.given = 0
            return False

    def claim_shed(self, idle):
        """How many of this process's ``idle`` connections to close for the waiters.

        Waiters minus the connections other processes are already closing for
        them, so that one waiter does not make every process close one."""
        header = self.state.header
        if not header.waiting or not idle:
            return 0
        with self.state.locked() as cells:
            shedding = sum(ss.Process.column(cells, 'shedding'))
            count = max(min(header.waiting - shedding, idle), 0)
            if count:
                self.me.shedding += count
                self.count_shared_locked(cells, 'shed', count)
            return count

    # ------------------------------------------------------------------ under the lock
    def _give_back_shared_locked(self, cells, count):
        """This process holds ``count`` slots fewer; the best waiters get them."""
        held = self._held
        cells[held] = max(cells[held] - count, 0)
        if cells[_WAITING]:
            self.grant_shared_locked(cells)

    def _room_shared_locked(self, cells, priority):
        return self._has_room(self._usage_shared_locked(cells), priority)

    def _usage_shared_locked(self, cells):
        """(slots held by the instance, slots held by cron processes)."""
        helds = cells[_HELDS]
        parked = cells[_PARKED]     # parked connections belong to no process
        if not self.cron_reserve:
            return sum(helds) + parked, 0
        roles = cells[_ROLES]
        return sum(helds) + parked, sum(held for role, held in zip(roles, helds)
                                        if role == _CRON_ROLE)

    def _has_room(self, usage, priority):
        held, cron_held = usage
        if priority == CRON or not self.cron_reserve:
            return held < self.budget
        # Others leave free the part of the cron reserve that cron does not use.
        return held < self.budget - max(self.cron_reserve - cron_held, 0)

    def _enqueue_shared_locked(self, cells, priority):
        """This borrower's :class:`~.shared_state.Waiter` row, taken from the free ones."""
        try:
            slot = ss.Waiter.column(cells, 'state').tolist().index(ss.FREE)
        except ValueError:
            raise RuntimeError(f'db_pooling shared state {self.state.path}: more than '
                               f'{ss.N_WAIT} borrowers waiting at once') from None
        header, waiter = self.state.header, ss.Waiter(cells, slot)
        header.ticket += 1
        waiter.pid = self.pid
        waiter.proc = self.row
        waiter.priority = priority
        waiter.ticket = header.ticket
        waiter.since = int(time.time() * 1000)
        waiter.state = ss.WAITING
        header.waiting += 1
        return waiter

    def grant_shared_locked(self, cells):
        """Hand free slots to waiters: best priority first, then oldest ticket."""
        header = self.state.header
        while header.waiting > 0:
            usage = self._usage_shared_locked(cells)
            best, best_key = None, None
            for slot, state in enumerate(ss.Waiter.column(cells, 'state')):
                if state == ss.WAITING:
                    waiter = ss.Waiter(cells, slot)
                    key = (waiter.priority, waiter.ticket)
                    if (best_key is None or key < best_key) and self._has_room(usage, key[0]):
                        best, best_key = waiter, key
            if best is None:
                return
            best.state = ss.GRANTED
            header.waiting -= 1
            self.state.process(best.proc).held += 1

    def count_shared_locked(self, cells, name, count=1):
        cells[self._counters[name]] += count

    # ------------------------------------------------------------------ published figures
    def publish(self, in_use, idle, long_lived, borrows=None, reused=None, opened=None):
        """Write this process's current figures (lock-free: only this process writes them)."""
        me = self.me
        me.in_use = in_use
        me.idle = idle
        me.long_lived = long_lived
        for name, value in (('borrows', borrows), ('reused', reused), ('opened', opened)):
            if value is not None:
                me.cells[me.counter(name)] = value

    def claim_idle_eviction(self, wanted):
        """How many of ``wanted`` timed-out idle connections this process may close
        while the instance keeps ``min_idle``; the answer is published at once."""
        with self.state.locked():
            allowed = max(min(wanted, self.state.idle_total() - self.min_idle), 0)
            self.me.idle -= allowed
            return allowed

    def describe_holders(self):
        """Who holds the budget, for the timeout error: 'pid 12 (http): 3 in use, 1 idle; ...'."""
        rows = sorted(self.state.processes(), key=lambda r: -r['held'])
        return '; '.join(f"pid {r['pid']} ({r['role']}): {r['held']} held, {r['in_use']} in use, "
                         f"{r['idle']} idle" for r in rows if r['held']) or 'none'


# Budgets of this process: a forked child takes a process row of its own.
_budgets = weakref.WeakSet()


def _after_fork_in_child():
    after_fork.each(_budgets, SharedBudget.after_fork_in_child)


after_fork.register('budget', _after_fork_in_child)
