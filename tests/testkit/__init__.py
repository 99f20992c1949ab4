"""Helpers the test modules share (fixtures are in the conftest.py files).

The suite is in folders by what a test needs, each folder a pytest marker
(registered in pyproject.toml, set by tests/conftest.py):

- ``engine/``     one process and real PostgreSQL servers
- ``processes/``  several real processes (fork, SIGKILL) on one shared budget
- ``odoo/``       real Odoo servers (skipped without an Odoo tree)
- ``deploy/``     packaging, docs, the Docker kit and the benchmarks' own tests

Across folders: ``odoo`` marks every test that needs Odoo (its folder or not),
``browser`` the ones that also need Chromium, ``soak`` the long invariant runs
(thousands of hand-overs, random SIGKILLs). ``pytest -m "not odoo and not soak"``
is the quick run.
"""
import os

import pytest

from odoo_pool_patch.devtools.odoo_runner import available_trees

FOLDER_MARKERS = ('engine', 'processes', 'odoo', 'deploy')   # the folders above
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, 'tests')

# The Odoo trees the Odoo-dependent modules run against (each sets
# ``pytestmark = requires_odoo`` and uses the ``odoo_tree`` fixture).
ODOO_TREES, NO_ODOO = available_trees()
requires_odoo = [pytest.mark.odoo, pytest.mark.skipif(not ODOO_TREES, reason=NO_ODOO or 'no Odoo')]


def backend_pid(cnx):
    """The server backend's pid behind a connection (one query)."""
    with cnx.cursor() as cur:
        cur.execute('SELECT pg_backend_pid()')
        return cur.fetchone()[0]


def notify_through(bouncer, channel, payload):
    """pg_notify on the ``postgres`` database (where Odoo's bus and cron notify)
    through the pooler, on a connection of its own."""
    import psycopg2
    cnx = psycopg2.connect(host=bouncer.host, port=bouncer.port, dbname='postgres', user='odoo')
    try:
        with cnx.cursor() as cur:
            cur.execute('SELECT pg_notify(%s, %s)', (channel, payload))
        cnx.commit()
    finally:
        cnx.close()


def client_info(pg, pki, host='localhost', mode='verify-full', rootcert='ca.crt', client=True):
    info = {'database': 'db1', 'host': host, 'port': pg.port, 'user': 'odoo',
            'application_name': 'tls-test', 'sslmode': mode, 'sslrootcert': pki.path(rootcert)}
    if client:
        info.update(sslcert=pki.path('client.crt'), sslkey=pki.path('client.key'))
    return info
