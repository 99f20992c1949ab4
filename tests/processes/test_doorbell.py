"""The maintenance threads' doorbell: a futex on the shared state, across real processes."""
import time

import pytest

from odoo_pool_patch.shared import shared_state as ss

from testkit.forks import collect, fork



@pytest.fixture
def state(tmp_path):
    state = ss.SharedState(str(tmp_path / 'segment'))
    if state.doorbell() is None:
        state.close()
        pytest.skip('no futex here (not Linux x86-64/arm64): the maintenance threads poll')
    yield state
    state.close()


def ring(state):
    bell = state.doorbell()
    with state.locked():
        bell.bump()
    bell.wake()


def test_a_ring_wakes_a_process_sleeping_on_its_own_mapping(state):
    seen = state.doorbell().value()     # read before the ring, as the maintenance thread does

    def sleeper():
        bell = ss.SharedState(state.path).doorbell()   # another mapping of the same file
        started = time.monotonic()
        bell.sleep(seen, 30)
        return time.monotonic() - started

    pid, fd = fork(sleeper)
    time.sleep(0.5)
    ring(state)
    assert collect(pid, fd) < 20        # woken (or never slept), not timed out


def test_no_ring_is_lost_between_reading_the_word_and_sleeping(state):
    bell = state.doorbell()
    seen = bell.value()
    ring(state)                         # rings after the sleeper read the word...
    started = time.monotonic()
    bell.sleep(seen, 30)                # ...so it does not sleep at all
    assert time.monotonic() - started < 20
    started = time.monotonic()
    bell.sleep(bell.value(), 0.05)      # nobody rings: the timeout ends it
    assert time.monotonic() - started >= 0.04


def test_the_shared_state_closes_with_its_doorbell(tmp_path):
    state = ss.SharedState(str(tmp_path / 'segment'))
    state.doorbell()
    state.close()                       # BufferError if the word still held the mapping
    assert state.map.closed
