"""Server sessions of the per-process pool (``pool.sessions``, :class:`SessionSteps`):
opening one in a reserved slot (through an outage of its server), filling in its record,
adopting Odoo's stock pool's, the statements sent ahead of a borrower's first one (role
timeouts, the session's name), and making an idle one ready for the next borrower
(liveness, reset as ``db_pool_reset`` says).
"""
import logging
import random
import time

import psycopg2
import psycopg2.extensions
import psycopg2.sql

from ..config.tls import explain_failure, record as record_tls
from ..dsn import key_database
from ..sessions import session_state
from ..sessions.conn_record import ensure_record
from ..sessions.session_tracking import restore_characteristics, run_reset, track
from ..shared.backend_exit import is_dead
from ..shared.budget import LONG_LIVED_DATABASES
from ..shared.exchange import gss_in_use
from ..shared.outage import OutageTimeout, opened_before_restart, server_of
from .borrowers import Holder
from .slots import IDLE, IN_USE

_logger = logging.getLogger('odoo.sql_db.pool')
monotonic = time.monotonic

# libpq keepalives of direct connections: a LISTEN connection idle for hours
# notices a dead server or NAT drop within about a minute and a half.
DIRECT_KEEPALIVES = {'keepalives': 1, 'keepalives_idle': 60, 'keepalives_interval': 10,
                     'keepalives_count': 3}


class SessionSteps:
    """Opening, preparing and resetting the server sessions of one
    :class:`.connection_pool.ConnectionPool` (``pool.sessions``, see the module)."""

    def __init__(self, pool):
        self.pool = pool
        self.books = pool.books
        self._app_names = {}         # dsn key -> its application_name ('' if none)
        # (name, standard_conforming_strings) -> 'SET application_name = ...; '
        self._name_sqls = {}
        self._prefixes = (None, None)   # (settings, {role: SET LOCAL timeouts})

    def open_in_slot(self, connection_info, key, holder):
        """Connect in a slot already reserved (``books.opening``); give it back on failure.
        Through an outage of the server, waits for it until ``db_pool_wait_timeout`` after
        the borrow began (see :mod:`.outage`); a replica's failure is the router's to handle."""
        direct = self.direct_info(connection_info, key)
        info = direct or connection_info
        pool = self.pool
        outages = pool.outages()
        server = server_of(info)
        replica = pool.router is not None and server in pool.router.replica_names
        try:
            if replica:
                cnx = psycopg2.connect(connection_factory=pool.connection_factory, **info)
            else:
                cnx = outages.connect(
                    lambda: psycopg2.connect(connection_factory=pool.connection_factory, **info),
                    server, holder.since + pool.settings.wait_timeout,
                    pool.settings.wait_timeout)
        except BaseException as exc:
            with self.books.lock:
                self.books.opening -= 1
                if pool.budget is not None:
                    pool.budget.release()
                if self.books.waiters:
                    self.books.hand_off_locked()
            explained = (explain_failure(exc, info)
                         if isinstance(exc, psycopg2.OperationalError) and
                         not isinstance(exc, OutageTimeout) else None)
            if explained:
                _logger.warning('%s', explained)
                raise psycopg2.OperationalError(explained) from exc
            _logger.info('Connection to the database failed')
            raise
        self.prepare_connection(cnx, key)
        record = cnx.pooled
        if not replica:             # (a replica has no outage row: the router bans it)
            record.gen_cells = outages.cells
            record.gen_cell, record.gen = outages.generation(server)
        record.direct = (direct is not None) if pool.settings.direct_host else None
        record.prefix = self.prefix(cnx, key, holder)
        record_tls(cnx, info)
        with self.books.lock:
            self.books.opening -= 1
            self.books.move_locked(cnx, IN_USE, holder)
            pool.stats.opened += 1
        return cnx

    def prepare_connection(self, cnx, key):
        """Fill in the record (``cnx.pooled``) of a new connection for ``key``."""
        now = monotonic()
        lifetime = self.pool.settings.max_lifetime
        record = ensure_record(cnx)             # (adopted from Odoo's stock pool: none yet)
        record.key = key
        record.pool = self.pool
        record.born = record.last_used = now
        # Up to 10% jitter so that connections opened together do not all
        # recycle together.
        record.expires = now + lifetime * (1 - 0.1 * random.random()) if lifetime else 0
        record.reuses = 0
        info = cnx.info                         # (a new object at each access)
        record.pid = info.backend_pid           # a taken one's libpq may say another's
        # Its name now and at start-up (a taken one's: from the donor, see Sharing.take).
        record.app = record.app0 = info.parameter_status('application_name') or ''
        record.tracked = track(cnx)
        exchange = self.pool.budget.exchange if self.pool.budget is not None else None
        # Offered to other processes when idle: plain connections of ordinary databases.
        record.khash = exchange.hash_of(key) if exchange is not None and record.tracked \
            and not cnx.closed and not info.ssl_in_use and not gss_in_use(cnx) else 0

    def adopt(self, cnx, key, in_use):
        """Take over a connection of Odoo's stock pool this one replaces (no other
        thread sees this pool yet): in use by an unknown holder, or idle."""
        self.prepare_connection(cnx, key)
        with self.books.lock:
            if in_use:
                self.books.move_locked(cnx, IN_USE, Holder(None))
            else:
                self.books.move_locked(cnx, IDLE)

    def direct_info(self, connection_info, key):
        """connection_info for PostgreSQL itself (db_direct_host/port) when this
        connection needs a real session: those to the long-lived databases
        (``postgres``: the bus and cron LISTEN). None: connect as asked."""
        settings = self.pool.settings
        if not settings.direct_host or key_database(key) not in LONG_LIVED_DATABASES:
            return None
        direct = dict(connection_info, host=settings.direct_host, **DIRECT_KEEPALIVES)
        if settings.direct_port:
            direct['port'] = settings.direct_port
        return direct

    def prefix(self, cnx, key, holder):
        """``cnx.pooled.prefix`` of a borrow: the role's timeouts, after ``SET
        application_name`` when the session does not have this process's name for
        ``key`` (taken from another process, reset): see session_tracking."""
        record = cnx.pooled
        prefix = self._timeouts_prefix(key, holder)
        app = self._app_names.get(key)
        if app is None:
            app = self._app_names[key] = dict(key).get('application_name') or ''
        if not app or record.app == app:
            record.name = record.name_sql = None
            return prefix
        record.name = app
        # Quoted for this connection's standard_conforming_strings (a database may set it).
        quoting = (app, cnx.info.parameter_status('standard_conforming_strings'))
        name_sql = self._name_sqls.get(quoting)
        if name_sql is None:
            name_sql = self._name_sqls[quoting] = psycopg2.sql.SQL(
                'SET application_name = {}; ').format(psycopg2.sql.Literal(app)).as_string(cnx)
        record.name_sql = name_sql
        return name_sql + prefix

    def _timeouts_prefix(self, key, holder):
        """The SET LOCAL statements of the borrower's role (http or cron), sent
        with the first statement of each transaction; '' when none is set."""
        if key_database(key) in LONG_LIVED_DATABASES:
            return ''
        settings, prefixes = self._prefixes
        if settings is not self.pool.settings:       # hashing Settings costs more than this
            settings = self.pool.settings
            prefixes = {role: settings.timeouts_prefix(role) for role in ('http', 'cron')}
            self._prefixes = settings, prefixes
        budget = self.pool.budget
        cron = holder.thread.startswith('odoo.service.cron') or (
            budget is not None and budget.role == 'cron')
        return prefixes['cron' if cron else 'http']

    def revive(self, cnx):
        """Make an idle connection ready for a new borrower; False if it is dead."""
        try:
            if is_dead(cnx):
                raise psycopg2.OperationalError('closed by the server while idle')
            if opened_before_restart(cnx):
                raise psycopg2.OperationalError('opened before its server restarted')
            self._reset(cnx)
        except psycopg2.Error as exc:
            _logger.info('%r: replacing a dead idle connection to %r (%s)', self.pool,
                         key_database(cnx.pooled.key), str(exc).strip().splitlines()[0])
            return False
        return True

    def _reset(self, cnx):
        """Clear what the previous borrower left in the session.

        ``always``: psycopg2's reset() as stock Odoo (ABORT if needed, DISCARD
        ALL: a round trip every reuse). ``smart``: nothing for a clean
        connection, the narrowest statements for the kinds its cursors saw, the
        full reset for what only it clears, every ``db_pool_reset_every``
        reuses, and when idle past ``db_pool_check_after`` (then it is also the
        liveness check). A transaction left open is rolled back in all cases.
        """
        settings = self.pool.settings
        record = cnx.pooled
        dirty = record.dirty
        record.reuses += 1
        if settings.reset != 'smart' or dirty & session_state.FULL or not record.tracked:
            outcome = 'reset_full'
        elif settings.reset_every and record.reuses % settings.reset_every == 0:
            outcome = 'reset_every'
        elif not dirty and settings.check_after and \
                monotonic() - record.last_used > settings.check_after:
            outcome = 'reset_checked'
        else:
            outcome = 'reset_narrow' if dirty else 'reset_skipped'
        rolled_back = False
        if outcome in ('reset_narrow', 'reset_skipped'):
            if cnx.status != psycopg2.extensions.STATUS_READY or \
                    cnx.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                cnx.rollback()
                rolled_back = True
            narrow = session_state.narrow_reset(dirty)
            if narrow:
                run_reset(cnx, narrow)
                if dirty & session_state.SET:
                    record.app = record.app0    # RESET ALL: the start-up name
            else:
                restore_characteristics(cnx)
        else:
            cnx.reset()             # ABORT (in a transaction) + DISCARD ALL
            record.params = None
            record.app = record.app0            # (the borrow names it again)
            record.name_tx = False
        record.dirty = 0
        stats = self.pool.stats
        with self.books.lock:
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            stats.reset_rollback += rolled_back
            if dirty:
                for name, bit in session_state.KINDS.items():
                    if dirty & bit:
                        setattr(stats, 'dirty_' + name, getattr(stats, 'dirty_' + name) + 1)
