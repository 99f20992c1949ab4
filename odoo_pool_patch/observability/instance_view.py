"""One view of an instance's connections: the totals and the process rows that the
dashboard, ``odoo-pool top`` and the metrics all show, summed in one place.

Parked connections (see parking) are idle and hold slots of the budget, but belong to
no process: the totals count them in ``held`` and ``idle`` (and on their own in
``parked``); no process row or role does.
"""
import time
from dataclasses import dataclass

from ..shared import shared_state as ss

CONNECTIONS = ('held', 'in_use', 'idle', 'long_lived')
TOTALS = CONNECTIONS + ('parked', 'waiting', 'budget', 'cron_reserve', 'min_idle')


@dataclass(frozen=True, slots=True)
class InstanceView:
    """The instance at one moment.

    ``processes``: one dict per live process, by role then pid, with the fields of
    :meth:`.SharedState.processes` and ``longest``, its longest current borrow
    (``{'age', 'database', 'site'}``) or None. ``counters``: {role: {counter: total}},
    processes that are gone included. Without a shared state (one process, see
    ``dashboard.local_figures``) ``budget``, ``cron_reserve``, ``min_idle`` and
    ``counters`` are None.
    """
    held: int
    in_use: int
    idle: int
    long_lived: int
    parked: int
    waiting: int
    budget: int | None
    cron_reserve: int | None
    min_idle: int | None
    processes: tuple
    counters: dict | None

    def totals(self):
        """{name: value} of :data:`TOTALS`."""
        return {name: getattr(self, name) for name in TOTALS}

    def roles(self):
        """{role: {'processes': count, 'held': ..., 'in_use': ..., 'idle': ...,
        'long_lived': ...}} of every role, without the parked connections."""
        names = ('processes',) + CONNECTIONS
        found = {role: dict.fromkeys(names, 0) for role in ss.ROLES}
        for row in self.processes:
            sums = found.setdefault(row['role'], dict.fromkeys(names, 0))
            sums['processes'] += 1
            for name in CONNECTIONS:
                sums[name] += row[name]
        return found


def of_processes(processes, parked=0, waiting=0, budget=None, cron_reserve=None,
                 min_idle=None, counters=None):
    """The view of these process rows (dicts with :data:`CONNECTIONS`, ``role``, ``pid``)
    and these instance figures."""
    processes = tuple(sorted(processes, key=lambda row: (row['role'], row['pid'])))
    sums = {name: sum(row[name] for row in processes) for name in CONNECTIONS}
    sums['held'] += parked
    sums['idle'] += parked
    return InstanceView(**sums, parked=parked, waiting=waiting, budget=budget,
                        cron_reserve=cron_reserve, min_idle=min_idle, processes=processes,
                        counters=counters)


def read(state, now=None):
    """The view of a :class:`.SharedState`, read without its lock (nothing written)."""
    now = time.time() if now is None else now
    rows = state.live_processes()
    for row in rows:
        longest = state.longest_borrow(row['row'], row['pid'])
        if longest:
            longest['age'] = max(now - longest.pop('since_ms') / 1000, 0.0)
        row['longest'] = longest
    header = state.header
    return of_processes(rows, parked=header.parked, waiting=header.waiting,
                        budget=header.budget, cron_reserve=header.cron_reserve,
                        min_idle=header.min_idle, counters=state.counter_totals())
