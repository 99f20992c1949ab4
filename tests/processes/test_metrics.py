"""Prometheus text from the shared state: parseable, instance-wide, counters monotonic."""
import os
import signal
import time

from prometheus_client.parser import text_string_to_metric_families

from odoo_pool_patch.observability import metrics
from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.config.options import Settings, load_settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool


def samples(text):
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_parse_and_counters_survive_a_killed_worker(pg, info, tmp_path):
    path = str(tmp_path / 'segment')
    budget = SharedBudget(ss.SharedState(path), 6, role='http')
    pool = ConnectionPool(4, budget=budget, timer_period=0.1)
    cnx = pool.borrow(info())
    time.sleep(0.2)                                     # published by the tick
    pid = os.fork()
    if pid == 0:                                        # pragma: no cover - child
        try:
            child = ConnectionPool(4, budget=SharedBudget(ss.SharedState(path), 6, role='cron'),
                                   timer_period=0.05)
            for _ in range(5):
                child.give_back(child.borrow(info('db2')))
            time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.time() + 10
    while time.time() < deadline:
        before = samples(metrics.render(budget.state))
        if before.get(('odoo_db_pool_borrows_total', (('role', 'cron'),))) == 5:
            break
        time.sleep(0.05)
    assert before[('odoo_db_pool_borrows_total', (('role', 'cron'),))] == 5
    assert before[('odoo_db_pool_budget', ())] == 6
    assert before[('odoo_db_pool_connections', (('role', 'http'), ('state', 'in_use')))] == 1
    assert before[('odoo_db_pool_connections', (('role', 'cron'), ('state', 'held')))] == 1
    assert before[('odoo_db_pool_processes', (('role', 'cron'),))] == 1
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    budget.state.reap(force=True)
    after = samples(metrics.render(budget.state))
    assert after[('odoo_db_pool_processes', (('role', 'cron'),))] == 0
    assert after[('odoo_db_pool_connections', (('role', 'cron'), ('state', 'held')))] == 0
    for key, value in before.items():
        if key[0].endswith('_total'):
            assert after[key] >= value, key           # counters never go backwards
    pool.give_back(cnx)
    pool.shutdown()


def test_metrics_token_is_validated_and_never_shown():
    settings = load_settings({'db_pool_metrics_token': 'a' * 24}.get)
    assert settings.metrics_token == 'a' * 24
    assert settings.as_options()['db_pool_metrics_token'] == '(set)'
    assert 'a' * 24 not in settings.describe()
    assert Settings().as_options()['db_pool_metrics_token'] is None
    for bad in ('short', 'has a space in it 0123456789'):
        try:
            load_settings({'db_pool_metrics_token': bad}.get)
        except ValueError as exc:
            assert 'at least 16 characters without spaces' in str(exc)
        else:
            raise AssertionError(bad)
