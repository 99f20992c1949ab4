"""The dashboard, ``odoo-pool top`` and the metrics show one view of the instance: the same
totals and processes for the same shared state. Real PostgreSQL, forked workers with
connections in use, idle and parked, then a full budget with a borrower waiting."""
import os
import re
import threading

from prometheus_client.parser import text_string_to_metric_families

from odoo_pool_patch.cli import top
from odoo_pool_patch.observability import dashboard, metrics

from testkit.peers import master, parked, peer, pool_factory

TOTALS = (  # in the order top shows them
    'budget', 'held', 'in_use', 'idle', 'parked', 'long_lived', 'waiting')
CONNECTIONS = ('held', 'in_use', 'idle', 'long_lived')
TOP_TOTALS = re.compile(r'budget (\d+)  held (\d+)  in use (\d+)  idle (\d+) \(parked (\d+)\)  '
                        r'long-lived (\d+)  waiting (\d+)  ')
TOP_ROW = re.compile(r'^ *(\d+) (\w+) +(\d+) +(\d+) +(\d+) +(\d+) ', re.M)


def from_dashboard(state):
    figures = dashboard.shared_figures(state)
    return ({name: figures['totals'][name] for name in TOTALS},
            sorted((row['pid'], row['role'], *(row[name] for name in CONNECTIONS))
                   for row in figures['workers']))


def from_top(state):
    text = top.render(state)
    found = TOP_TOTALS.match(text)
    assert found, text
    return ({name: int(value) for name, value in zip(TOTALS, found.groups())},
            sorted((int(pid), role, *map(int, figures))
                   for pid, role, *figures in TOP_ROW.findall(text)))


def from_metrics(state):
    """Totals (connections summed over every role label, as a Prometheus ``sum by
    (state)`` does) and {role: (processes, held, in use, idle, long-lived)}."""
    values = {}
    for metric_family in text_string_to_metric_families(metrics.render(state)):
        for sample in metric_family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    connections = [(dict(labels), value) for (name, labels), value in values.items()
                   if name == 'odoo_db_pool_connections']
    totals = {name: int(values[(f'odoo_db_pool_{name}', ())])
              for name in ('budget', 'parked', 'waiting')}
    totals.update({name: int(sum(value for labels, value in connections
                                 if labels['state'] == name)) for name in CONNECTIONS})
    processes = {dict(labels)['role']: int(value) for (name, labels), value in values.items()
                 if name == 'odoo_db_pool_processes'}
    by_role = {role: (count, *(int(sum(value for labels, value in connections
                                       if labels == {'role': role, 'state': name}))
                               for name in CONNECTIONS))
               for role, count in processes.items() if count}
    return totals, by_role


def role_sums(rows):
    """{role: (processes, held, in use, idle, long-lived)} of (pid, role, figures...) rows."""
    sums = {}
    for _pid, role, *figures in rows:
        count, *totals = sums.get(role, (0, 0, 0, 0, 0))
        sums[role] = (count + 1, *(a + b for a, b in zip(totals, figures)))
    return sums


def shown_alike(pg, state, expected):
    """Waits for the dashboard to show ``expected`` (maintenance ticks publish each
    process's figures), then checks that top and the metrics show the same: the
    totals, each process, and each role's processes and connections."""
    pg.wait_until(lambda: from_dashboard(state)[0] == expected)
    totals, rows = from_dashboard(state)
    top_totals, top_rows = from_top(state)
    metric_totals, metric_roles = from_metrics(state)
    assert {'dashboard': totals, 'top': top_totals, 'metrics': metric_totals} == \
        {'dashboard': expected, 'top': expected, 'metrics': expected}
    assert top_rows == rows
    assert metric_roles == role_sums(rows)
    return rows


def test_dashboard_top_and_metrics_show_the_same_instance(pg, info, tmp_path):
    shared = master(str(tmp_path / 'segment'), budget=6)
    make = pool_factory(shared, wait_timeout=30)
    pool, peers = make(), []
    try:
        in_use_idle_and_parked_then_a_waiter(pg, info, tmp_path, shared, make, pool, peers)
    finally:
        for each in peers:
            each.stop()
        pool.shutdown()
        shared.exchange.close()


def in_use_idle_and_parked_then_a_waiter(pg, info, tmp_path, shared, make, pool, peers):
    a = peer(peers, tmp_path, info, make)
    b = peer(peers, tmp_path, info, make)
    a.do('borrow', 'db2')
    b.do('borrow', 'db2')                   # b needs db2 too: a parks the one it gives back
    a.do('back', 'db2')
    assert parked(shared) == 1
    mine = [pool.borrow(info('db1')), pool.borrow(info('db1'))]
    pool.give_back(mine.pop())              # nobody else needs db1: it stays idle here
    rows = shown_alike(pg, shared.state, {'budget': 6, 'held': 4, 'in_use': 2, 'idle': 2,
                                          'parked': 1, 'long_lived': 0, 'waiting': 0})
    assert {row[0]: row[2:5] for row in rows} == {a.pid: (0, 0, 0), b.pid: (1, 1, 0),
                                                  os.getpid(): (2, 1, 1)}

    # Every slot in use, then a borrower of this process waits for one: waiting, not in
    # use (it holds a slot of its process's pool but none of the budget, see pool.figures).
    mine.append(pool.borrow(info('db1')))   # the idle one
    a.do('borrow', 'db2')                   # the parked one
    a.do('borrow', 'db3')
    b.do('borrow', 'db3')
    waiter = threading.Thread(target=lambda: mine.append(pool.borrow(info('db1'))))
    waiter.start()
    try:
        shown_alike(pg, shared.state, {'budget': 6, 'held': 6, 'in_use': 6, 'idle': 0,
                                       'parked': 0, 'long_lived': 0, 'waiting': 1})
    finally:
        pool.give_back(mine.pop(0))         # its slot goes to the waiter
        waiter.join(30)
    assert not waiter.is_alive() and len(mine) == 2
    for cnx in mine:
        pool.give_back(cnx)
