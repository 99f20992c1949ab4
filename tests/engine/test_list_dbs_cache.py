"""db_pool_list_dbs_cache: the database list kept a moment per process, cleared
instance-wide through the shared state (the Odoo side is in test_odoo_server.py)."""
import os

from odoo_pool_patch.odoo_glue.list_dbs_cache import TimedList
from odoo_pool_patch.shared.shared_state import SharedState


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def counting(answers):
    calls = []

    def fetch():
        calls.append(1)
        return list(answers)
    return fetch, calls


def test_list_is_fetched_once_per_ttl_and_copied():
    clock = Clock()
    fetch, calls = counting(['a', 'b'])
    cached = TimedList(fetch, 2.0, clock=clock)
    first = cached()
    first.append('mutated by a caller')
    assert cached() == ['a', 'b'] and len(calls) == 1
    clock.now += 1.9
    assert cached() == ['a', 'b'] and len(calls) == 1
    clock.now += 0.2
    assert cached() == ['a', 'b'] and len(calls) == 2


def test_empty_answer_is_not_kept():
    fetch, calls = counting([])
    cached = TimedList(fetch, 60.0, clock=Clock())
    cached(), cached()
    assert len(calls) == 2


def test_other_process_clearing_refetches_here(tmp_path):
    """A database created in one worker: the other workers' caches are stale at once."""
    state = SharedState(str(tmp_path / 'state'))
    clock = Clock()
    fetch, calls = counting(['a'])
    cached = TimedList(fetch, 60.0, state.db_list_generation, state.bump_db_list_generation,
                       clock=clock)
    cached()
    pid = os.fork()
    if pid == 0:                # another worker clears its cache (created a database)
        other = TimedList(fetch, 60.0, state.db_list_generation, state.bump_db_list_generation)
        other.clear()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    cached()
    assert len(calls) == 2
    cached()
    assert len(calls) == 2
