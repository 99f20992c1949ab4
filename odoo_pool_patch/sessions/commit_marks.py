"""Whether this thread may have committed something: a count each way a transaction can
end committed on a pool connection bumps (a COMMIT sent, autocommit switched on, a
cursor class we cannot see into, two-phase commit; see :mod:`.session_tracking`).
:mod:`.request_retry` compares it before and after a request: a request whose count
moved must not run again."""
import threading

_local = threading.local()      # Odoo's gevent worker patches it to greenlet-local


def committed():
    """Note that something may have been committed by this thread."""
    _local.commits = getattr(_local, 'commits', 0) + 1


def count():
    """This thread's count so far."""
    return getattr(_local, 'commits', 0)
