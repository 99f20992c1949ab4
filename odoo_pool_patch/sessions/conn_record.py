"""What the pool knows about one of its connections: ``cnx.pooled``, a :class:`ConnRecord`.

Every connection of the pool's connection class (:class:`.session_tracking.SessionTracking`
mixed into psycopg2's or Odoo's) has one from its creation; a connection adopted from
Odoo's stock pool gets one when it is tracked. The record lives as long as the psycopg2
object: a shell (see :mod:`.exchange`) that takes the next session of its database keeps
its record, and the take sets every field that describes a session (the donor's
:meth:`ConnRecord.meta`, :meth:`ConnRecord.take_over`, then ``Sharing.take``). One
thread owns a connection at a time (the pool's books say which), and only that thread
or the pool under its lock writes the record; fields are plain attributes, read without
locks.
"""


class ConnRecord:
    """The pool's bookkeeping of one connection (see the module's docstring).

    Identity and books (set by ``SessionSteps.prepare_connection``):

    - ``key``: the DSN key it serves (:func:`.dsn.dsn_key`); ``pool``: the pool it
      belongs to; ``khash``: its database's key hash when it may move between processes
      (0: never offered, parked or taken).
    - ``born``, ``last_used``, ``expires`` (0: no max lifetime), ``reuses``: monotonic
      seconds and counts; a taken connection keeps its donor's.
    - ``pid``: the backend pid (a shell's libpq reports the stand-in's); ``tracked``:
      its cursors report session state (False: always the full reset).
    - ``state``: where it is in its pool's books (``pool.slots``: OUT, IN_USE, IDLE,
      PARKING, LENDING, CLOSING), changed only by ``Books.move_locked``.
    - ``lent_at``: the pool's close_all count when it left for another process.
    - ``shell``: the psycopg2 object was made by a take (its libpq started against a
      stand-in): it may take the next session of its database.

    Session state (see :mod:`.session_tracking`):

    - ``dirty``: the kinds of session state its borrowers left (:mod:`.session_state`);
      ``auth``: the identity when the pool got it; ``params``: its session parameters,
      cached (:func:`.exchange.session_params`).
    - ``prefix``: the SET LOCAL statements (and the pending name) sent with the first
      statement of each transaction; ``app``, ``app0``, ``name``, ``name_sql``,
      ``name_tx``: its ``application_name`` as described in :mod:`.session_tracking`.

    The borrow and the server:

    - ``asked``: connection_info of a borrow whose first statement has not run
      (:mod:`.first_statement`); ``info``: connection_info of the borrow
      (:mod:`.request_retry`); ``cancel_info``: a taken connection's, for its cancel().
    - ``direct``: True sent to ``db_direct_host``, False that option is set but not for
      this connection, None it is not set.
    - ``gen_cells``, ``gen_cell``, ``gen``: its server's outage generation when opened
      (see :mod:`.outage`).
    """
    __slots__ = ('key', 'khash', 'pool', 'born', 'last_used', 'expires', 'reuses', 'pid',
                 'tracked', 'state', 'lent_at', 'shell',
                 'dirty', 'auth', 'params', 'prefix', 'app', 'app0', 'name', 'name_sql',
                 'name_tx',
                 'asked', 'info', 'cancel_info', 'direct', 'gen_cells', 'gen_cell', 'gen')

    def __init__(self):
        self.key = self.pool = self.pid = self.lent_at = None
        self.khash = self.reuses = self.dirty = self.gen = self.state = 0     # state: OUT
        self.born = self.last_used = self.expires = 0
        self.tracked = self.shell = self.name_tx = False
        self.auth = self.params = self.app = self.app0 = self.name = self.name_sql = None
        self.prefix = ''
        self.asked = self.info = self.cancel_info = self.direct = None
        self.gen_cells = self.gen_cell = None

    def meta(self):
        """What a process taking this connection over needs (see
        :func:`.exchange.session_meta`, which adds the session parameters)."""
        return {'params': self.params, 'app': self.app or '', 'app0': self.app0 or '',
                'pid': self.pid, 'born': self.born, 'expires': self.expires,
                'reuses': self.reuses,
                'gen': [self.gen_cell, self.gen]}    # (see outage; same shared state)

    def take_over(self, meta):
        """The session's fields from its donor's :meth:`meta` (a take): age, lifetime,
        reuses, backend pid, parameters, and its name now and at start-up (a shell's libpq
        knows neither)."""
        self.born, self.expires, self.reuses, self.pid = \
            meta['born'], meta['expires'], meta['reuses'], meta['pid']
        self.params = meta['params']
        self.app = meta['app']
        self.app0 = meta.get('app0', meta['app'])
        self.name_tx = False
        self.gen_cell, self.gen = meta.get('gen') or (None, 0)

    def __repr__(self):
        return f'<ConnRecord pid={self.pid} khash={self.khash} dirty={self.dirty}>'


def record_of(cnx):
    """``cnx``'s record, or None for a connection that is not the pool's."""
    return getattr(cnx, 'pooled', None)


def ensure_record(cnx):
    """``cnx``'s record, made if it has none (a connection adopted from Odoo's stock
    pool was not created with one)."""
    record = getattr(cnx, 'pooled', None)
    if record is None:
        record = cnx.pooled = ConnRecord()
    return record
