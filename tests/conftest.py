"""Shared fixtures: real PostgreSQL clusters started in temp directories.

``pg`` is one primary for the whole session (databases ``db1``..``db3`` and
the role ``odoo`` exist). Tests isolate themselves by a unique
``application_name`` (the ``app`` fixture), which is also how they count
their own server connections in ``pg_stat_activity``.
"""
import logging
import os
import uuid

import pytest

from odoo_pool_patch.devtools.embedded_pg import Cluster
from testkit import FOLDER_MARKERS, NO_ODOO, ODOO_TREES

DATABASES = ('db1', 'db2', 'db3')


@pytest.fixture(scope='session')
def pg():
    cluster = Cluster('primary').init().start()
    try:
        cluster.create_role('odoo')
        for name in DATABASES:
            cluster.create_database(name)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope='session')
def pki(tmp_path_factory):
    """A throw-away CA, a server certificate for localhost and a client one for odoo."""
    import shutil
    from odoo_pool_patch.devtools.embedded_pg import ThrowawayPKI
    if not shutil.which('openssl'):
        pytest.skip('openssl not installed')
    directory = tmp_path_factory.mktemp('pki')
    os.chmod(directory, 0o755)
    return ThrowawayPKI(str(directory))


@pytest.fixture
def app():
    """A unique application_name for this test's connections."""
    return 'dbpt-' + uuid.uuid4().hex[:10]


@pytest.fixture
def info(pg, app):
    """connection_info(dbname) -> an Odoo-style connection_info dict for ``pg``."""
    def make(dbname='db1', **extra):
        data = {'database': dbname, 'application_name': app, 'host': pg.host,
                'port': pg.port, 'user': 'odoo', 'password': 'unused', 'sslmode': 'disable'}
        data.update(extra)
        return data
    return make


@pytest.fixture
def pools():
    """Factory of pools that are shut down after the test."""
    from odoo_pool_patch.pool.connection_pool import ConnectionPool
    made = []

    def make(maxconn=4, **kwargs):
        pool = ConnectionPool(maxconn, **kwargs)
        made.append(pool)
        return pool
    yield make
    for pool in made:
        pool.shutdown()


@pytest.fixture
def pool_log(caplog):
    caplog.set_level(logging.INFO, logger='odoo.sql_db')
    return caplog


def pytest_report_header(config):
    if ODOO_TREES:
        return 'Odoo series under test: ' + ', '.join(f'{t.series} ({t.path})' for t in ODOO_TREES)
    return f'Odoo-dependent tests will be SKIPPED: {NO_ODOO}'


@pytest.fixture(scope='module', params=ODOO_TREES or [None],
                ids=lambda t: t.series if t else 'none')
def odoo_tree(request):
    """Each Odoo tree found, one module-scoped run per series."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """Each test gets its folder's marker, and ``odoo`` when it runs Odoo (the
    ``odoo_tree`` fixture, or ``requires_odoo``), wherever it lives."""
    for item in items:
        folder = os.path.basename(os.path.dirname(str(item.path)))
        if folder in FOLDER_MARKERS:
            item.add_marker(folder)
        if 'odoo_tree' in item.fixturenames and not item.get_closest_marker('odoo'):
            item.add_marker('odoo')


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(pytest_report_header(None))


@pytest.fixture(scope='session')
def bouncer(pg):
    """A PgBouncer in transaction mode in front of ``pg`` (skips when not installed)."""
    from odoo_pool_patch.devtools.embedded_pgbouncer import PgBouncer, find_pgbouncer
    if find_pgbouncer() is None:
        pytest.skip('pgbouncer is not installed (apt-get install pgbouncer; .ci/run does it as root)')
    server = PgBouncer(pg).start()
    yield server
    server.destroy()


@pytest.fixture(scope='session')
def replica_set(pg):
    """Two streaming replicas of ``pg`` made with pg_basebackup: (replica1, replica2).
    Tests that stop, pause or delay one put it back as they found it."""
    first = pg.make_replica('replica1')
    try:
        second = pg.make_replica('replica2')
        try:
            yield first, second
        finally:
            second.destroy()
    finally:
        first.destroy()
