"""Who borrows a connection: the holder of a borrowed connection and where it was
borrowed, for the pool's timeout error, leak warnings, the dashboard and ``odoo-pool top``."""
import os
import sys
import threading
import time

from ..dsn import key_database

monotonic = time.monotonic


class Holder:
    """Who holds a borrowed connection: for the timeout error and leak warnings."""
    __slots__ = ('since', 'wall_since', 'site', 'thread', 'url', 'warned')

    def __init__(self, site):
        thread = threading.current_thread()
        self.since = monotonic()
        self.wall_since = time.time()
        self.site = site
        self.thread = thread.name
        self.url = getattr(thread, 'url', None)   # set by Odoo's HTTP layer
        self.warned = False

    def describe(self, cnx, now):
        who = f"thread {self.thread!r}" + (f" ({self.url})" if self.url else '')
        return (f"database {key_database(cnx.pooled.key)!r} for {now - self.since:.1f} s "
                f"by {who} at {format_site(self.site)}")


# Frames in these files are plumbing between the real caller and the pool's borrow.
_HERE = os.path.dirname(os.path.abspath(__file__))
_PLUMBING = ('sql_db.py', os.sep + 'registry.py', 'contextlib.py',
             os.path.join(_HERE, 'connection_pool.py'),
             os.path.join(os.path.dirname(_HERE), 'replicas', 'router.py'))


def borrow_site(depth=2):
    """(file, line, function) of the first caller outside pool plumbing."""
    frame = sys._getframe(depth)
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_PLUMBING):
        frame = frame.f_back
    code = frame.f_code
    return code.co_filename, frame.f_lineno, code.co_name


def format_site(site):
    return '%s:%d in %s' % site if site else 'unknown'
