"""Named fault points in the hand-over protocols, for tests to delay, raise or SIGKILL at.

Every step where a server session, its descriptor or its budget slot changes
hands (exchange, parking, budget) calls ``if faults.plan: faults.hit(NAME)``.
In production ``plan`` is an empty dict: the check is one global lookup and a
truth test, nothing else runs. A test arms points in its own process (forked
children inherit them) with :func:`arm`::

    faults.arm({'exchange.taker.after_wrap': ('delay', 0.8)})
    faults.arm({'parking.park.after_count': 'kill'}, only_pid=child_pid)

Actions: ``('delay', seconds)``, ``('random_delay', max_seconds)`` (uniform),
``'raise'`` (:class:`InjectedError`, an ``Exception``), ``'raise_base'``
(:class:`InjectedInterrupt`, a ``BaseException`` like Odoo's SIGXCPU handler's
or gevent's ``Timeout``), ``'kill'`` (SIGKILL of this process), or a callable
taking the point's name. :data:`POINTS` lists every point; :func:`arm` refuses
others, so a renamed point cannot silently disarm a test.
"""
import os
import random
import signal
import time

POINTS = (
    # exchange, taker side (exchange.IdleExchange._take_from)
    'exchange.taker.after_receive',     # descriptor received, not yet wrapped
    'exchange.taker.after_wrap',        # under our libpq, slot not yet taken (late taker)
    'exchange.taker.after_take_slot',   # slot ours, acknowledgement not sent
    'exchange.taker.after_ack',         # acknowledged, not yet returned to the pool
    # exchange, donor side (exchange.IdleExchange._answer)
    'exchange.donor.after_lend',        # out of the pool's books, not yet promised
    'exchange.donor.after_promise',     # promised to the request's serial, not yet sent
    'exchange.donor.after_send',        # sent, acknowledgement not yet read
    'exchange.donor.before_settle',     # about to settle the hand-over (given or kept)
    # parking (parking.Parking.park / _receive)
    'parking.park.before_lock',
    'parking.park.after_send',          # counted and sent, shared lock still held
    'parking.park.after_lock',          # parked; the parker's copy not yet dropped
    'parking.receive.after_receive',    # received, slot ours, not yet wrapped
    'parking.receive.after_wrap',       # wrapped, not yet in the pool's books
    # budget
    'budget.take_slot.locked',          # inside the shared lock of a taker's take_slot
    'budget.settle.locked',             # inside the shared lock of a donor's settle
)


class InjectedError(Exception):
    """Raised at an armed fault point ('raise')."""


class InjectedInterrupt(BaseException):
    """Raised at an armed fault point ('raise_base'): not an Exception, as SIGXCPU's."""


plan = {}       # point -> action; empty: off
_only = [None]  # pid the plan applies to (None: every process that inherits it)


def arm(points, only_pid=None):
    """Arm ``points`` ({name: action}) in this process and the children it forks next."""
    unknown = set(points) - set(POINTS)
    if unknown:
        raise ValueError(f'unknown fault points {sorted(unknown)}; see faults.POINTS')
    plan.clear()
    plan.update(points)
    _only[0] = only_pid


def disarm():
    plan.clear()
    _only[0] = None


def hit(name):
    """Run the action armed at ``name``, if any (callers test ``plan`` first)."""
    action = plan.get(name)
    if action is None or (_only[0] is not None and _only[0] != os.getpid()):
        return
    if callable(action):
        action(name)
    elif action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    elif action == 'raise':
        raise InjectedError(name)
    elif action == 'raise_base':
        raise InjectedInterrupt(name)
    elif action[0] == 'delay':
        time.sleep(action[1])
    elif action[0] == 'random_delay':
        time.sleep(random.random() * action[1])
    else:
        raise ValueError(f'unknown fault action {action!r} at {name}')
