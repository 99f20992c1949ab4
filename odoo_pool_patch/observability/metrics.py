"""Prometheus text exposition of an instance's pool figures: its
:class:`.instance_view.InstanceView`, as the dashboard and ``odoo-pool top`` show it.

Gauges are the current state of every live process, labelled by role (parked
connections, held by no process, as role ``parked``);
counters add the totals of processes that are gone (kept in the shared state
when their row is reaped), so they never go backwards when Odoo recycles a
worker.
"""
from ..shared import shared_state as ss
from . import instance_view

PREFIX = 'odoo_db_pool'
PARKED_ROLE = 'parked'     # the role label of parked connections, which no process holds
COUNTER_HELP = {
    'borrows': 'Connections borrowed (cursors opened).',
    'reused': 'Borrows served by an idle connection of the process.',
    'opened': 'Server connections opened.',
    'closed': 'Server connections closed and given back to the budget.',
    'waits': 'Borrowers that waited for a slot of the budget.',
    'timeouts': 'Borrowers that gave up after db_pool_wait_timeout.',
    'shed': 'Idle connections closed because another process waited.',
    'taken': 'Borrows served by an idle connection another process gave (db_pool_shared_idle).',
    'unparked': 'Borrows served by a parked connection (db_pool_shared_idle).',
}


def _line(name, value, **labels):
    if labels:
        text = ','.join(f'{key}="{val}"' for key, val in labels.items())
        return f'{name}{{{text}}} {value}'
    return f'{name} {value}'


SERVER_GAUGES = (
    ('server_up', 'Whether the server may serve reads now (1) or is banned, down or lagging (0).'),
    ('server_lag_seconds', 'Replay lag of a replica (seconds since the primary passed its '
                           'replay position; 0 when it has replayed everything).'),
    ('server_lag_bytes', 'Replay lag of a replica in bytes of WAL.'),
)


def render_servers(rows):
    """Per-server figures of replica routing (:func:`.replica_health.servers_status`)."""
    if not rows:
        return []
    out = []
    for name, help_text in SERVER_GAUGES:
        out += [f'# HELP {PREFIX}_{name} {help_text}', f'# TYPE {PREFIX}_{name} gauge']
        for row in rows:
            value = {'server_up': int(row['health'] == 'healthy'),
                     'server_lag_seconds': row['lag_seconds'],
                     'server_lag_bytes': row['lag_bytes']}[name]
            if value is not None:
                out.append(_line(f'{PREFIX}_{name}', value, server=row['name'], kind=row['kind']))
    for name, help_text in (('reads', 'Read-only cursors served.'),
                            ('writes', 'Read/write cursors served.')):
        metric = f'{PREFIX}_server_{name}_total'
        out += [f'# HELP {metric} {help_text}', f'# TYPE {metric} counter']
        out += [_line(metric, row[name], server=row['name'], kind=row['kind']) for row in rows]
    metric = f'{PREFIX}_server_fallbacks_total'
    out += [f'# HELP {metric} Reads a replica did not serve (replica rows) or the primary served '
            f'instead of a replica (primary row), by reason.', f'# TYPE {metric} counter']
    for row in rows:
        for reason, count in row['fallbacks'].items():
            out.append(_line(metric, count, server=row['name'], kind=row['kind'], reason=reason))
    return out


def render(state):
    view = instance_view.read(state)
    roles = view.roles()
    out = [
        f'# HELP {PREFIX}_budget Server connections the instance may hold (db_pool_max_connections).',
        f'# TYPE {PREFIX}_budget gauge',
        _line(f'{PREFIX}_budget', view.budget),
        f'# HELP {PREFIX}_waiting Borrowers waiting for a slot of the budget.',
        f'# TYPE {PREFIX}_waiting gauge',
        _line(f'{PREFIX}_waiting', view.waiting),
        f'# HELP {PREFIX}_parked Idle connections parked for any process to take (their '
        f'slots belong to no process).',
        f'# TYPE {PREFIX}_parked gauge',
        _line(f'{PREFIX}_parked', view.parked),
        f'# HELP {PREFIX}_processes Live processes attached to the shared state.',
        f'# TYPE {PREFIX}_processes gauge',
    ]
    for role in ss.ROLES:
        out.append(_line(f'{PREFIX}_processes', roles[role]['processes'], role=role))
    out += [f'# HELP {PREFIX}_connections Server connections by process role and state '
            f'(held counts every slot of the budget a process holds). Parked connections '
            f'(idle, their slots held by no process) are role "{PARKED_ROLE}", so that '
            f'summed over roles held and idle are the instance\'s, as on the dashboard.',
            f'# TYPE {PREFIX}_connections gauge']
    roles[PARKED_ROLE] = {'held': view.parked, 'in_use': 0, 'idle': view.parked,
                          'long_lived': 0}
    for role in ss.ROLES + (PARKED_ROLE,):
        for state_name in instance_view.CONNECTIONS:
            out.append(_line(f'{PREFIX}_connections', roles[role][state_name],
                             role=role, state=state_name))
    totals = view.counters
    for counter, help_text in COUNTER_HELP.items():
        name = f'{PREFIX}_{counter}_total'
        out += [f'# HELP {name} {help_text}', f'# TYPE {name} counter']
        for role in ss.ROLES:
            out.append(_line(name, totals[role][counter], role=role))
    from ..replicas.replica_health import servers_status
    out += render_servers(servers_status())
    return '\n'.join(out) + '\n'
