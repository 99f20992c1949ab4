"""A short per-process cache of Odoo's database list (``db_pool_list_dbs_cache``).

Stock Odoo answers every request that has no session database (JSON-RPC
``/jsonrpc`` and ``/xmlrpc`` calls, the login page, the database selector) by
listing the databases, which opens a connection to the ``postgres`` database
and closes it right after. With a shared budget that is a server connection
opened and closed per request, on top of the request's own: it takes a slot
each time and evicts someone's idle connection to get it. Keeping the list
for a couple of seconds in each process removes nearly all of them.

A database created, duplicated, renamed, restored or dropped through Odoo
clears the cache of every process of the instance at once when the shared
budget is on (a generation counter in the shared state, read without a lock),
of this process only otherwise. Databases created or dropped outside Odoo
(``createdb``, ``psql``) show up or go within the cache's lifetime.
"""
import time

# odoo.service.db functions after which the list has changed (or must be fresh).
INVALIDATING = ('exp_create_database', 'exp_duplicate_database', 'exp_drop', 'exp_rename',
                'exp_restore', 'restore_db')


class TimedList:
    """Calls ``fetch()`` at most once per ``ttl`` seconds, and again whenever
    ``generation()`` changed, and returns copies of its list.

    An empty answer is not kept (stock Odoo returns [] when listing failed)."""

    def __init__(self, fetch, ttl, generation=lambda: 0, bump=None, clock=time.monotonic):
        self.fetch = fetch
        self.ttl = ttl
        self.generation = generation
        self.bump = bump
        self.clock = clock
        self.entry = None           # (list, expiry, generation)

    def __call__(self):
        entry, now, generation = self.entry, self.clock(), self.generation()
        if entry is not None and now < entry[1] and entry[2] == generation:
            return list(entry[0])
        value = self.fetch()        # generation read before: a change meanwhile refetches
        if value:
            self.entry = (list(value), now + self.ttl, generation)
        return value

    def clear(self):
        """Forget the list, here and (with ``bump``) in the other processes."""
        self.entry = None
        if self.bump:
            self.bump()


def install(ttl, state=None):
    """Wrap ``odoo.service.db.list_dbs`` (and the functions that change the list) so that
    the list is read from the server at most once per ``ttl`` seconds; ``state``: the
    instance's :class:`~.shared_state.SharedState`, for instance-wide invalidation.
    Idempotent; ``ttl`` 0 leaves stock behaviour."""
    from odoo.service import db as service_db
    from odoo.tools import config
    if not ttl or getattr(service_db.list_dbs, 'db_pooling', False):
        return None
    original = service_db.list_dbs
    generation = bump = None
    if state is not None:
        generation = state.db_list_generation
        bump = state.bump_db_list_generation
    cache = TimedList(lambda: original(True), ttl, generation or (lambda: 0), bump)

    def list_dbs(force=False):
        if not force and not config['list_db']:
            return original(force)      # stock's AccessDenied
        if config['db_name'] and not config['dbfilter']:
            return original(force)      # from the configuration: no query to save
        return cache()
    list_dbs.db_pooling = True
    list_dbs.cache = cache
    service_db.list_dbs = list_dbs

    for name in INVALIDATING:
        function = getattr(service_db, name, None)
        if function is not None:
            setattr(service_db, name, _clearing(function, cache))
    return cache


def _clearing(function, cache):
    def wrapper(*args, **kwargs):
        cache.clear()
        try:
            return function(*args, **kwargs)
        finally:
            cache.clear()
    wrapper.__name__ = function.__name__
    wrapper.__wrapped__ = function
    return wrapper
