"""What a forked child does first, in one stated order.

Odoo's prefork server forks its workers from a master that already made the
shared state, the budget, the parking lots and maybe pools. Each engine module
that keeps something per process registers a step here; one ``os.register_at_fork``
hook runs the steps in a forked child in the order of :data:`ORDER`, whatever
the order the modules were imported in:

1. ``shared_state``  drop the parent's process rows and state locks (the rows stay
                     the parent's; the child registers its own)
2. ``budget``        register the child's own row in each budget (needs 1)
3. ``parking``       close the copies of sessions the parent had on their way
                     between processes (else they outlive their owner)
4. ``outage``        forget the parent's probes, waiting borrowers and their locks
5. ``replica_health`` fresh locks for the replica monitor and the router's counts
                     (the parent's health thread takes them every tick), its
                     counts not yet flushed left to the parent
6. ``maintenance``   a fresh lock, no timer thread, no pools yet (the thread
                     is started again by the first pool that needs it)
7. ``pool``          each pool forgets the parent's connections (their sockets
                     are the parent's: closing them would end its sessions)

A step raising is logged and the next steps still run: a child half reset is
worse than a child with one step failed and said.
"""
import logging
import os
import traceback

_logger = logging.getLogger('odoo.sql_db')

ORDER = ('shared_state', 'budget', 'parking', 'outage', 'replica_health', 'maintenance', 'pool')
_steps = {}


def identity(fd):
    """What ``fd`` is open on (device, inode), to be told apart from whatever the number
    is given to once it is closed; None if it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def close_inherited(fd, was):
    """In a forked child: close our copy of ``fd`` if it is still what it was when noted
    (``was``, from :func:`identity`). A thread of the parent may have closed that number
    and another file taken it just before the fork (a pipe the forking thread made), and
    that one is not ours to close."""
    if was is not None and identity(fd) == was:
        try:
            os.close(fd)
        except OSError:
            pass


def each(items, reset):
    """``reset(item)`` for every item, all of them even if one raises (the first error is
    raised at the end, for :func:`run_in_child` to say)."""
    error = None
    for item in list(items):
        try:
            reset(item)
        except Exception as exc:            # noqa: BLE001 - raised below
            error = error or exc
    if error is not None:
        raise error


def register(name, step):
    """Run ``step()`` in every forked child, at ``name``'s place in :data:`ORDER`."""
    if name not in ORDER:
        raise ValueError(f'after_fork: unknown step {name!r} (known: {", ".join(ORDER)})')
    _steps[name] = step


def run_in_child():
    failed = []
    for name in ORDER:
        step = _steps.get(name)
        if step is None:
            continue
        try:
            step()
        except Exception:                   # noqa: BLE001 - see the module docstring
            failed.append((name, traceback.format_exc()))
    # Said once every step ran: a handler may borrow a connection (Odoo's --log-db), which
    # must not happen from pools not reset yet; with the pools' step failed, not at all.
    for name, text in failed:
        message = f'db_pooling: resetting {name} in a forked child failed\n{text}'
        if any(step == 'pool' for step, _ in failed):
            os.write(2, message.encode(errors='replace'))
        else:
            _logger.error(message)


os.register_at_fork(after_in_child=run_in_child)
