"""Upkeep and introspection of the per-process pool (``pool.upkeep``, :class:`Upkeep`):
the maintenance pass (idle timeout, max lifetime, dead sockets, leak warnings; leaked
connections are reclaimed by ``Books.reclaim_used_locked``, which borrowers short of a
slot also call), shedding idle connections for the shared budget's waiters, and the
figures the dashboard, ``odoo-pool top`` and the metrics read.
"""
import logging
import time

from ..dsn import key_database
from ..sessions import session_state
from ..shared.backend_exit import is_dead
from ..shared.budget import LONG_LIVED_DATABASES
from ..shared.outage import opened_before_restart
from .borrowers import format_site
from .slots import CLOSING

_logger = logging.getLogger('odoo.sql_db.pool')
monotonic = time.monotonic


class PoolStats:
    """Monotonic counters of one pool (the dashboard sums them across pools)."""
    __slots__ = ('borrows', 'reused', 'opened', 'waits', 'timeouts', 'closed_idle',
                 'closed_lifetime', 'closed_dead', 'closed_room', 'reclaimed_leaked',
                 'dead_replaced', 'leak_warnings', 'shed', 'budget_waits', 'budget_timeouts',
                 # Odoo cursors moved to a new connection when theirs died before its first
                 # statement (see first_statement)
                 'first_statement_retries',
                 # requests run again on a new connection after the server closed theirs
                 # with nothing committed (see request_retry)
                 'request_retries',
                 # budget waiters served with a connection to their database given back by
                 # another thread of this process, instead of a new one
                 'handed_over',
                 # idle connections taken from / given to other processes (db_pool_shared_idle)
                 'taken', 'given',
                 # idle connections parked for any process / taken from the parking (see
                 # parking)
                 'parked', 'unparked',
                 # borrows that waited (up to AWAIT_BUSY) for another process's connection
                 # in use to their database rather than open one
                 'awaited',
                 # How reused connections were reset (db_pool_reset): skipped (clean), narrow
                 # (dirty), full (always mode, or what only DISCARD ALL clears), every
                 # (db_pool_reset_every), checked (idle past db_pool_check_after), rollback
                 # (given back inside a transaction), closed (LOAD), and the kinds of
                 # session state found dirty.
                 'reset_skipped', 'reset_narrow', 'reset_full', 'reset_every', 'reset_checked',
                 'reset_rollback', 'reset_closed',
                 *('dirty_' + name for name in session_state.KINDS))

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class Upkeep:
    """Maintenance passes and figures of one :class:`.connection_pool.ConnectionPool`
    (``pool.upkeep``, see the module)."""

    def __init__(self, pool):
        self.pool = pool
        self.books = pool.books

    def maintain(self):
        """One maintenance pass (the timer calls this every ``timer_period``)."""
        settings = self.pool.settings
        now = monotonic()
        with self.books.lock:
            doomed = self._evict_idle_locked(now, settings)
            self.books.reclaim_used_locked()
            if settings.leak_warn_after:
                self._warn_leaks_locked(now, settings.leak_warn_after)
            if self.books.waiters:
                self.books.hand_off_locked()
        if doomed:
            self.books.retire(doomed)

    def shed_idle(self):
        """While borrowers wait for the shared budget, close idle connections,
        least recently used first (the maintenance thread calls this often)."""
        if self.pool.budget is None or not self.pool.budget.waiting() or not self.books.n_idle:
            return 0
        with self.books.lock:
            if self.books.waiters:
                return 0
            doomed, shed = self.claim_shed_locked(self.books.n_idle)
        if doomed:
            self.books.retire(doomed, shed)
        return len(doomed)

    def claim_shed_locked(self, most):
        """Move to CLOSING up to ``most`` LRU idle connections that the
        budget's waiters need (never more than other processes leave to close)."""
        shed = self.pool.budget.claim_shed(min(most, self.books.n_idle))
        doomed = [self.books.least_recently_used_idle_locked(CLOSING) for _ in range(shed)]
        self.pool.stats.shed += shed
        return doomed, shed

    def _evict_idle_locked(self, now, settings):
        """Move the idle connections that must go to CLOSING; returns them."""
        idle_deadline = now - settings.idle_timeout if settings.idle_timeout else None
        doomed, timed_out = [], []
        for stack in sorted(self.books.idle.values(), key=lambda st: st[0].pooled.last_used):
            for cnx in list(stack):
                if is_dead(cnx) or opened_before_restart(cnx):
                    reason = 'closed_dead'
                elif cnx.pooled.expires and cnx.pooled.expires <= now:
                    reason = 'closed_lifetime'
                elif idle_deadline is not None and cnx.pooled.last_used <= idle_deadline:
                    timed_out.append(cnx)     # least recently used first
                    continue
                else:
                    continue
                self.books.move_locked(cnx, CLOSING)
                doomed.append(cnx)
                setattr(self.pool.stats, reason, getattr(self.pool.stats, reason) + 1)
        if timed_out and self.pool.budget is not None:
            # min_idle connections stay open instance-wide: ask the shared state
            # how many of ours may go, so that two processes never both close
            # the last ones.
            timed_out = timed_out[:self.pool.budget.claim_idle_eviction(len(timed_out))]
        for cnx in timed_out:
            self.books.move_locked(cnx, CLOSING)
            doomed.append(cnx)
            self.pool.stats.closed_idle += 1
        return doomed

    def _warn_leaks_locked(self, now, limit):
        for cnx, holder in self.books.used.items():
            if not holder.warned and now - holder.since >= limit:
                holder.warned = True
                self.pool.stats.leak_warnings += 1
                _logger.warning(
                    '%r: a connection has been borrowed for more than %d s '
                    '(db_pool_leak_warn_after): %s. A cursor held this long is usually '
                    'a cursor that was never closed.', self.pool, limit, holder.describe(cnx, now))

    def snapshot(self):
        """Plain data about this pool, for the dashboard, the CLI and tests."""
        now = monotonic()
        with self.books.lock:
            return {
                'readonly': self.pool.readonly,
                'maxconn': self.books.maxconn,
                'in_use': len(self.books.used),
                'idle': self.books.n_idle,
                'opening': self.books.opening,
                'closing': self.books.closing,
                'waiting': len(self.books.waiters),
                'holders': [
                    {'database': key_database(c.pooled.key), 'age': now - h.since,
                     'site': format_site(h.site), 'thread': h.thread, 'url': h.url}
                    for c, h in sorted(self.books.used.items(), key=lambda item: item[1].since)],
                'stats': self.pool.stats.as_dict(),
            }

    def longest_borrow(self):
        """(wall-clock start, database, site) of the oldest current borrow, or None."""
        with self.books.lock:
            if not self.books.used:
                return None
            cnx, holder = min(self.books.used.items(), key=lambda item: item[1].since)
            return holder.wall_since, key_database(cnx.pooled.key), format_site(holder.site)

    def figures(self):
        """Cheap counts for the shared state: in use (long-lived ones apart, being opened
        included), idle. A borrower waiting for the budget is not in use: its local slot
        (in ``books.opening``) has no slot of the budget yet, so it would show more in use than
        the process holds."""
        with self.books.lock:
            long_lived = sum(1 for cnx in self.books.used
                             if key_database(cnx.pooled.key) in LONG_LIVED_DATABASES)
            budget_waits = self.pool.sharing.budget_waits
            waiting = sum(map(len, budget_waits.values())) if budget_waits else 0
            return {'in_use': len(self.books.used) - long_lived + self.books.opening - waiting,
                    'idle': self.books.n_idle, 'long_lived': long_lived}
