"""Our connections note the session state their users leave behind.

The pool sets :class:`TrackingCursor` as the ``cursor_factory`` of every
connection it opens (Odoo creates its cursors with ``cnx.cursor()``), and the
connection class mixes in :class:`SessionTracking` to see autocommit toggles.
Each ``execute`` ORs the kinds of :func:`.session_state.known_kinds` (the decision of
:func:`.session_state.session_kinds`, remembered per text) into
``cnx.pooled.dirty`` (its :mod:`.conn_record`); the pool reads that mask when the
connection is reused and clears exactly that (see ``SessionSteps.revive`` of the pool).

The same hook adds the per-role ``SET LOCAL`` timeouts (``cnx.pooled.prefix``,
chosen at borrow) in front of the first statement of each transaction, so they
cost no round trip and end with the transaction, and warns once when a
statement that needs a real session goes through a transaction pooler.

The session's name (``application_name``, ``odoo-<role>-<pid>``) travels the same
way. A session taken from another process, or reset by ``RESET ALL``/``DISCARD
ALL``, has another process's name; the borrow puts ``SET application_name`` in
front of the prefix (``cnx.pooled.name``: the name wanted), and the transaction
that carried it, once committed, makes it the session's (``cnx.pooled.app``). A
rollback undoes the ``SET`` on the server, so the name stays pending and the next
transaction carries it again. No round trip of its own: until the borrower's
first transaction, ``pg_stat_activity`` shows the previous holder's name.
Fields of ``cnx.pooled``, all of the thread holding the connection:

- ``app``: the name the session has on the server as far as the pool knows
  (libpq's ``parameter_status`` cannot say for a taken connection: its libpq
  started against a stand-in, see exchange);
- ``app0``: its start-up name, what ``RESET ALL`` and ``DISCARD ALL`` go back to;
- ``name``: the name the borrow wants, while the session does not have it
  (None: nothing pending);
- ``name_tx``: the open transaction began with ``SET application_name =
  name`` (set by the cursor once that statement left, with BEGIN before it;
  cleared by ``rollback``, by a transaction whose first statement is a SET, and by
  ``commit``, which counts the name only if that transaction was still open: a
  COMMIT of a failed transaction is a ROLLBACK); once counted, the SET is taken
  out of the borrow's prefix (``name_sql``).

A ``%`` in the prefix (an administrator's name) is doubled when psycopg2 formats
the statement's parameters; the quoted name is cached per
``standard_conforming_strings``.
"""
import logging

import psycopg2
import psycopg2.extensions as ext
import psycopg2.sql

from . import commit_marks
from .conn_record import ConnRecord, ensure_record, record_of
from .session_state import (AUTOCOMMIT, COMMITTED, HOLD, ROLE, SESSION_ONLY, UNKNOWN, known_kinds,
                            names, session_kinds)

_logger = logging.getLogger('odoo.sql_db.pool')

_execute = ext.cursor.execute
_copy_expert = ext.cursor.copy_expert
_cursor = ext.connection.cursor
_executemany = ext.cursor.executemany
_callproc = ext.cursor.callproc
_autocommit = ext.connection.autocommit
_commit = ext.connection.commit
_rollback = ext.connection.rollback
_tpc_prepare = ext.connection.tpc_prepare
_tpc_commit = ext.connection.tpc_commit
_set_session = ext.connection.set_session
_set_isolation_level = ext.connection.set_isolation_level
STATUS_READY = ext.STATUS_READY


def _text(query, cursor):
    if type(query) is bytes:
        return query.decode(cursor.connection.encoding == 'UTF8' and 'utf-8' or 'latin-1', 'replace')
    if hasattr(query, 'as_string'):         # psycopg2.sql.Composable
        return query.as_string(cursor)
    return str(query)


_SQL_VALUES = (ext.AsIs, psycopg2.sql.Composable)


def _carries_sql(vars):
    """Whether query parameters put SQL text in the query (AsIs, psycopg2.sql)."""
    values = vars.values() if type(vars) is dict else vars
    try:
        for value in values:
            if isinstance(value, _SQL_VALUES):
                return True
    except TypeError:
        pass
    return False


class TrackingCursor(ext.cursor):
    """A plain psycopg2 cursor whose ``execute`` records session-state kinds."""

    def execute(self, query, vars=None):
        cnx = self.connection
        text = query if type(query) is str else _text(query, self)
        kinds = known_kinds(text)
        if vars and not kinds and _carries_sql(vars):
            kinds = session_kinds(_text(self.mogrify(query, vars), self))
        if kinds:
            _note(cnx, kinds, text)
        record = cnx.pooled
        if self.name is not None:
            if self.withhold:
                record.dirty |= HOLD
        elif record.prefix and cnx.status == STATUS_READY and not _autocommit.__get__(cnx):
            # First statement of a transaction (psycopg2 sends BEGIN before it):
            # the role's timeouts, and the session's name if pending, go in the
            # same round trip. Not before a SET, which may be SET TRANSACTION
            # (it must come first).
            if text.lstrip()[:3].upper() == 'SET':
                record.name_tx = False        # (this transaction does not carry it)
                return _execute(self, query, vars)
            prefix = record.prefix
            if vars is not None and '%' in prefix:
                prefix = prefix.replace('%', '%%')  # psycopg2 formats the whole text
            query = prefix + text
            if record.name is not None:
                record.name_tx = False
                try:
                    return _execute(self, query, vars)
                finally:
                    # Carried only if it left: psycopg2 formats the parameters, then
                    # sends BEGIN (READY still: nothing was sent).
                    record.name_tx = cnx.status != STATUS_READY
        return _execute(self, query, vars)

    def copy_expert(self, sql, file, size=8192):
        text = sql if type(sql) is str else _text(sql, self)
        kinds = known_kinds(text)           # COPY (SELECT set_config(...)) TO STDOUT
        if kinds:
            _note(self.connection, kinds, text)
        return _copy_expert(self, sql, file, size)

    def callproc(self, procname, parameters=None):
        kinds = session_kinds(f'SELECT {procname}()')    # the name is all that matters
        if kinds:
            _note(self.connection, kinds, f'SELECT {procname}(...)')
        return _callproc(self, procname, parameters)

    def executemany(self, query, vars_list):
        text = query if type(query) is str else _text(query, self)
        kinds = known_kinds(text)
        if kinds:
            _note(self.connection, kinds, text)
        return _executemany(self, query, vars_list)


def _note(cnx, kinds, text):
    record = cnx.pooled
    record.dirty |= kinds
    if kinds & (COMMITTED | UNKNOWN):       # UNKNOWN: code we cannot see into may commit
        commit_marks.committed()
    if kinds & SESSION_ONLY and not record.direct:
        warn_if_pooled(cnx, kinds, text)


class SessionTracking:
    """Mixin for the pool's connection class: autocommit toggles mark it dirty
    (psycopg2's reset puts autocommit and the session characteristics back;
    in autocommit mode set_session also changes server-side defaults). A commit
    sent and an autocommit toggle are told to :mod:`.commit_marks`: the thread's
    request must not run again (see request_retry)."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pooled = ConnRecord()

    def get_backend_pid(self):
        # A connection taken from another process may sit in a psycopg2 object of an
        # earlier session (exchange shells), whose libpq still reports that one's pid.
        pid = self.pooled.pid
        return pid if pid is not None else super().get_backend_pid()

    def cursor(self, *args, **kwargs):
        # A cursor of another class does not report what it runs: the full reset.
        factory = kwargs.get('cursor_factory', args[1] if len(args) > 1 else None)
        if factory is not None and not issubclass(factory, TrackingCursor):
            self.pooled.dirty |= UNKNOWN
            commit_marks.committed()   # what it runs (a COMMIT?) is not seen
        return _cursor(self, *args, **kwargs)

    @property
    def autocommit(self):
        return _autocommit.__get__(self)

    @autocommit.setter
    def autocommit(self, value):
        if value:
            self.pooled.dirty |= AUTOCOMMIT
            commit_marks.committed()
        _autocommit.__set__(self, value)

    def set_session(self, isolation_level=None, readonly=None, deferrable=None, autocommit=None):
        if autocommit:
            self.pooled.dirty |= AUTOCOMMIT
            commit_marks.committed()
        return _set_session(self, isolation_level, readonly, deferrable, autocommit)

    def set_isolation_level(self, level):
        if level == ext.ISOLATION_LEVEL_AUTOCOMMIT:
            self.pooled.dirty |= AUTOCOMMIT
            commit_marks.committed()
        return _set_isolation_level(self, level)

    def commit(self):
        if not self.closed:         # (closed: psycopg2 raises without sending anything)
            commit_marks.committed()
        record = self.pooled
        if not record.name_tx:
            return _commit(self)
        record.name_tx = False   # (a failed commit: the name stays pending)
        # The COMMIT of a failed transaction is a ROLLBACK (psycopg2 raises nothing).
        carried = self.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
        _commit(self)
        if carried:
            name_sql = record.name_sql
            if name_sql and record.prefix.startswith(name_sql):
                record.prefix = record.prefix[len(name_sql):]     # done: not again
            record.app, record.name = record.name, None

    def rollback(self):
        self.pooled.name_tx = False   # the SET of the name is undone with the rest
        return _rollback(self)

    def tpc_prepare(self):
        commit_marks.committed()   # another session may commit it
        return _tpc_prepare(self)

    def tpc_commit(self, *xid):
        commit_marks.committed()
        return _tpc_commit(self, *xid)


def tracked_class(connection_class):
    """``connection_class`` with :class:`SessionTracking` mixed in (cached)."""
    if issubclass(connection_class, SessionTracking):
        return connection_class
    cached = _classes.get(connection_class)
    if cached is None:
        cached = _classes[connection_class] = type(
            'Tracked' + connection_class.__name__, (SessionTracking, connection_class),
            {'__module__': __name__})
    return cached


_classes = {}


# ------------------------------------------------------------------ taken connections
class _ShellInfo:
    """``cnx.info`` of a taken connection: its libpq describes the stand-in it started
    with (see exchange), so the backend pid, host and port come from the pool."""
    __slots__ = ('_info', '_cnx')

    def __init__(self, info, cnx):
        self._info, self._cnx = info, cnx

    @property
    def backend_pid(self):
        pid = self._cnx.pooled.pid
        return pid if pid is not None else self._info.backend_pid

    @property
    def host(self):
        return (self._cnx.pooled.cancel_info or {}).get('host') or self._info.host

    @property
    def port(self):
        port = (self._cnx.pooled.cancel_info or {}).get('port')
        return int(port) if port else self._info.port

    def __getattr__(self, name):
        return getattr(self._info, name)


class ShellConnection:
    """Mixin of connections whose libpq started against a stand-in and holds a session
    taken from another process: libpq's cancel request would go to the stand-in's
    address with its key (0), so :meth:`cancel` asks the server itself."""
    @property
    def info(self):
        return _ShellInfo(_info.__get__(self), self)

    def cancel(self):
        info = self.pooled.cancel_info
        if info is None:
            return _cancel(self)
        # Any name the session may have now (a pending one: sent, not committed yet).
        record = self.pooled
        names = sorted({name for name in (record.app, record.name, record.app0) if name})
        cancel_session(info, record.pid, names or None)


_info = ext.connection.info
_cancel = ext.connection.cancel


def cancel_session(connection_info, pid, application_names):
    """Cancel what backend ``pid`` runs, from a short-lived connection with the same
    credentials; only if that backend still carries one of our session's names
    (behind a pooler the pid could be another session's). Raises like libpq's cancel."""
    info = dict(connection_info, application_name='odoo-db_pooling-cancel', connect_timeout=5)
    try:
        other = psycopg2.connect(**info)
    except psycopg2.Error as exc:
        raise psycopg2.OperationalError(f'could not send the cancel request: {exc}') from None
    try:
        other.autocommit = True
        with other.cursor() as cur:
            cur.execute('SELECT pg_cancel_backend(pid) FROM pg_stat_activity '
                        'WHERE pid = %s AND (%s IS NULL OR application_name = ANY(%s))',
                        (pid, application_names, application_names))
    finally:
        other.close()


_shell_classes = {}


def shell_class(connection_class):
    """``connection_class`` (tracked) with :class:`ShellConnection` mixed in (cached)."""
    cached = _shell_classes.get(connection_class)
    if cached is None:
        base = tracked_class(connection_class)
        cached = _shell_classes[connection_class] = type(
            'Shell' + connection_class.__name__, (ShellConnection, base),
            {'__module__': __name__})
    return cached


def privileges(cnx):
    """The session's identity as the server last reported it (no round trip; None on
    a closed connection): whether the current role is a superuser and, for a superuser
    login (only one can change it), the session user."""
    if cnx.closed:
        return None
    status = cnx.get_parameter_status
    superuser = status('is_superuser')
    auth = cnx.pooled.auth            # (None while it is being taken)
    if (superuser if auth is None else auth[0]) != 'on':
        return superuser, None      # an ordinary login cannot change its session user
    return superuser, status('session_authorization')


def privileges_changed(cnx):
    """Whether the session's identity changed since the pool got it, by a path
    :func:`.session_state.session_kinds` cannot see (a user function running ``SET
    ROLE`` or ``SET SESSION AUTHORIZATION``): the server reports ``is_superuser`` and
    ``session_authorization`` whenever they change. Not seen: ``SET ROLE`` between
    two roles on the same side of the superuser line (it needs membership), left to
    the periodic full reset. About a microsecond (two for a superuser login)."""
    return privileges(cnx) != cnx.pooled.auth


def note_privileges(cnx):
    """Mark ``cnx`` for the role's reset if :func:`privileges_changed` (before it can be
    reused, offered or parked)."""
    if privileges_changed(cnx):
        cnx.pooled.dirty |= ROLE


def track(cnx):
    """Make a connection (ours, or one adopted from Odoo's stock pool) track its
    session state. False when that is impossible (the pool then always resets it)."""
    record = ensure_record(cnx)         # (adopted from Odoo's stock pool: none yet)
    record.dirty = 0
    record.auth = None
    record.auth = privileges(cnx)
    if not isinstance(cnx, SessionTracking):
        try:
            cnx.__class__ = tracked_class(type(cnx))
        except TypeError:
            return False
    cnx.cursor_factory = TrackingCursor
    return True


def restore_characteristics(cnx):
    """Put psycopg2's client-side session characteristics back to their defaults,
    as its reset() does. No round trip outside autocommit."""
    if cnx.isolation_level is not None or cnx.readonly is not None or cnx.deferrable is not None:
        _set_session(cnx, 'DEFAULT', 'DEFAULT', 'DEFAULT')


def run_reset(cnx, sql):
    """Run reset statements in one round trip, outside a transaction and
    without being tracked themselves."""
    restore_characteristics(cnx)
    _autocommit.__set__(cnx, True)
    try:
        with ext.cursor(cnx) as cur:
            _execute(cur, sql)
    finally:
        _autocommit.__set__(cnx, False)


# ------------------------------------------------------------------ pooler warning
DIRECT_OPTIONS = 'db_direct_host / db_direct_port'
_verdicts = {}          # dsn key -> True when a transaction pooler sits in front
_warned = set()


def behind_pooler(cnx):
    """Whether ``cnx`` reaches PostgreSQL through a pooler: the backend pid the
    server reports differs from the one the pooler gave us at connection time
    (PgBouncer, Odyssey and PgCat make up their own). One query, once per DSN."""
    record = record_of(cnx)
    key = None if record is None else record.key
    verdict = _verdicts.get(key)
    if verdict is None:
        try:
            with ext.cursor(cnx) as cur:
                _execute(cur, 'SELECT pg_backend_pid()')
                verdict = cur.fetchone()[0] != cnx.get_backend_pid()
        except psycopg2.Error:
            return False        # aborted transaction: decide another time
        _verdicts[key] = verdict
    return verdict


def warn_if_pooled(cnx, kinds, text):
    database = cnx.info.dbname
    warned = (database, kinds & SESSION_ONLY)
    if warned in _warned or not behind_pooler(cnx):
        return
    _warned.add(warned)
    statement = ' '.join(text.split())[:120]
    if cnx.pooled.direct is None:
        advice = (f'Set {DIRECT_OPTIONS} in odoo.conf to the PostgreSQL server itself: '
                  'connections to the "postgres" database (bus, cron wake-ups) then go there '
                  'directly. ')
    else:
        advice = (f'{DIRECT_OPTIONS} only serve the "postgres" database (bus, cron wake-ups). ')
    _logger.warning(
        'db_pooling: %r needs a real PostgreSQL session (%s) but this connection to database '
        '%r goes through a pooler (server %s:%s hands out server connections per transaction), '
        'so it will silently not work. %sSession-only statements on other databases need a '
        'session-mode pooler entry for that database.',
        statement, ', '.join(names(kinds & SESSION_ONLY)), database, cnx.info.host,
        cnx.info.port, advice)
