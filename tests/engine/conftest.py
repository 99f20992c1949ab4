"""Fixtures of the single-process tests."""
import pytest

from odoo_pool_patch.devtools.embedded_pg import Cluster


@pytest.fixture(scope='module')
def tls_pg(pki):
    cluster = Cluster('tls').init().start()
    try:
        cluster.create_role('odoo')
        cluster.create_database('db1')
        cluster.enable_tls(pki, tls_only=True)
        yield cluster
    finally:
        cluster.destroy()
