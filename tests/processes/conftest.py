"""Fixtures of the multi-process tests."""
import pytest

from testkit.peers import master, pool_factory


@pytest.fixture
def family(tmp_path):
    """(budget, pool factory, peers started) of one master; everything ended after."""
    made = {'peers': [], 'pools': []}

    def start(budget=4, min_idle=0, **settings):
        shared = made['shared'] = master(str(tmp_path / 'segment'), budget, min_idle)
        make = pool_factory(shared, **settings)

        def pool():
            made['pools'].append(make())
            return made['pools'][-1]
        return shared, make, pool
    yield start, made['peers']
    for peer in made['peers']:
        peer.stop()
    for pool in made['pools']:
        pool.shutdown()
    if 'shared' in made:
        made['shared'].exchange.close()
