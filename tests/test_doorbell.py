"""The maintenance threads' doorbell: a futex on the shared state, across real processes."""
import os
import time

import pytest

from odoo_pool_patch import shared_state as ss
from odoo_pool_patch.doorbell import Doorbell

from tests.test_shared_budget import collect, fork


@pytest.fixture
def state(tmp_path):
    state = ss.SharedState(str(tmp_path / 'segment'))
    if state.doorbell() is None:
        state.close()
        pytest.skip('no futex here (not Linux x86-64/arm64): the maintenance threads poll')
    yield state
    state.close()


def test_a_ring_wakes_a_process_sleeping_on_its_own_mapping(state):
    def sleeper():
        bell = ss.SharedState(state.path).doorbell()   # another mapping of the same file
        started = time.monotonic()
        bell.sleep(bell.value(), 30)
        return time.monotonic() - started

    pid, fd = fork(sleeper)
    time.sleep(0.5)
    state.doorbell().ring()
    assert collect(pid, fd) < 20        # woken, not timed out


def test_no_ring_is_lost_between_reading_the_word_and_sleeping(state):
    bell = state.doorbell()
    seen = bell.value()
    bell.ring()                         # rings after the sleeper read the word...
    started = time.monotonic()
    bell.sleep(seen, 30)                # ...so it does not sleep at all
    assert time.monotonic() - started < 20
    started = time.monotonic()
    bell.sleep(bell.value(), 0.05)      # nobody rings: the timeout ends it
    assert time.monotonic() - started >= 0.04


def test_the_shared_state_closes_with_its_doorbell(tmp_path):
    state = ss.SharedState(str(tmp_path / 'segment'))
    bell = state.doorbell()
    state.close()                       # would raise BufferError with the word still mapped
    assert bell is None or isinstance(bell, Doorbell)
