"""The data of the live dashboard (Settings > Technical > Database Connections).

Pure Python, no Odoo import: the addon's ``/db_pooling/dashboard_data`` route
calls :func:`collect` with what it has (the shared state, a cursor, the
primary's connection parameters). Every source is read separately, so one
that fails (the database server, a replica, the replica module) becomes a
readable line in ``errors`` instead of an empty page.
"""
import os
import re
import time

from ..config import tls
from ..shared import shared_state as ss
from . import instance_view

HISTORY_SECONDS = 3600
# application_name of our connections: odoo-<role>-<pid> (see odoo_install.app_name),
# or stock Odoo's odoo-<pid>.
_OUR_APP = re.compile(r'^odoo-(?:[a-z]+-)?(\d+)$')
ACTIVITY_SQL = """
    SELECT coalesce(datname, ''), coalesce(state, ''), coalesce(application_name, ''),
           coalesce(usename, ''), count(*)
      FROM pg_stat_activity
     WHERE backend_type = 'client backend'
  GROUP BY 1, 2, 3, 4
  ORDER BY 1, 3, 2
"""
LIMITS_SQL = ("SELECT current_setting('max_connections')::int, "
              "current_setting('superuser_reserved_connections')::int")


def describe_error(exc):
    """libpq's multi-line message on one line, or the exception's type."""
    return ' '.join(str(exc).split()) or type(exc).__name__


def figures_of(view, history):
    """The dashboard's figures of an :class:`.instance_view.InstanceView`: totals,
    processes (with their longest borrow) and history samples."""
    return {'totals': view.totals(), 'workers': [dict(row) for row in view.processes],
            'history': history}


def shared_figures(state, now=None):
    """Totals, live processes (with their longest borrow) and the last hour of history."""
    now = time.time() if now is None else now
    since = (now - HISTORY_SECONDS) * 1000
    history = [list(sample) for sample in state.history() if sample[ss.S_TIME] >= since]
    return figures_of(instance_view.read(state, now), history)


def local_figures(snapshots, role, now=None):
    """The same shape as :func:`shared_figures` for one process without a shared state."""
    row = {'pid': os.getpid(), 'role': role, 'in_use': 0, 'idle': 0, 'long_lived': 0,
           'borrows': 0, 'waits': 0, 'timeouts': 0, 'longest': None}
    for snap in snapshots:
        row['in_use'] += snap['in_use']
        row['idle'] += snap['idle']
        row['borrows'] += snap['stats'].get('borrows', 0)
        row['waits'] += snap['stats'].get('waits', 0)
        row['timeouts'] += snap['stats'].get('timeouts', 0)
        for holder in snap['holders'][:1]:
            if row['longest'] is None or holder['age'] > row['longest']['age']:
                row['longest'] = {'age': holder['age'], 'database': holder['database'],
                                  'site': holder['site']}
    row['held'] = row['in_use'] + row['idle']
    view = instance_view.of_processes([row], waiting=sum(s['waiting'] for s in snapshots))
    return figures_of(view, [])


def server_activity(cursor, our_pids):
    """max_connections and pg_stat_activity's client backends, grouped, ours marked."""
    cursor.execute(LIMITS_SQL)
    max_connections, reserved = cursor.fetchone()
    cursor.execute(ACTIVITY_SQL)
    rows = []
    for database, state, app, user, count in cursor.fetchall():
        match = _OUR_APP.match(app)
        rows.append({'database': database, 'state': state or 'unknown (not visible to this user)',
                     'application_name': app, 'user': user, 'count': count,
                     'ours': bool(match and int(match.group(1)) in our_pids)})
    return {'max_connections': max_connections, 'superuser_reserved': reserved,
            'rows': rows}


def by_database(activity_rows):
    """[{database, ours, others}] from :func:`server_activity` rows."""
    found = {}
    for row in activity_rows:
        entry = found.setdefault(row['database'], {'database': row['database'],
                                                   'ours': 0, 'others': 0})
        entry['ours' if row['ours'] else 'others'] += row['count']
    return sorted(found.values(), key=lambda entry: entry['database'])


def replica_servers():
    """Every server of replica routing (:func:`.replica_health.servers_status`), or None
    when routing is off in this process."""
    from ..replicas.replica_health import servers_status
    return list(servers_status()) or None


def tls_of(host, port):
    state = tls.SERVERS.get((str(host), str(port)))
    if state is None:
        return {'sslmode': None, 'encrypted': None, 'protocol': None, 'cipher': None,
                'flagged': False, 'note': 'no connection opened by this worker yet'}
    return dict(state)


def servers(primary, activity, errors):
    """Primary first, then each replica, each with its TLS state."""
    host, port = primary.get('host', 'local socket'), primary.get('port', 5432)
    entries = [{'name': 'primary', 'host': str(host), 'port': str(port), 'kind': 'primary',
                'health': 'down' if activity is None else 'healthy',
                'connections': (sum(row['count'] for row in activity['rows'] if row['ours'])
                                if activity else None)}]
    try:
        replicas = replica_servers()
    except Exception as exc:        # the replica module failed: say so, keep the primary
        errors.append(f'Replica status could not be read: {describe_error(exc)}')
        replicas = None
    if replicas:
        if any(entry.get('kind') == 'primary' for entry in replicas):
            entries = []
        entries += [dict(entry) for entry in replicas]
    for entry in entries:
        entry['tls'] = tls_of(entry.get('host'), entry.get('port'))
        if replicas and entry.get('health') not in (None, 'healthy'):
            errors.append(f"{entry.get('kind', 'server')} {entry.get('name')} "
                          f"({entry.get('host')}:{entry.get('port')}) is {entry.get('health')}"
                          + (f" until {time.strftime('%H:%M:%S', time.localtime(entry['banned_until']))}"
                             if entry.get('banned_until') else ''))
    return entries


def collect(figures, primary, activity_cursor, settings, active, extra=None):
    """The whole dashboard payload.

    :param figures: :func:`shared_figures` or :func:`local_figures`.
    :param primary: the primary's connection parameters (host, port).
    :param activity_cursor: a cursor on the primary, or a callable(our_pids) returning
        :func:`server_activity` (it may raise: the error is reported, the rest still served).
    :param settings: effective settings, secrets already masked.
    """
    errors = []
    our_pids = {row['pid'] for row in figures['workers']} | {os.getpid()}
    try:
        activity = (activity_cursor(our_pids) if callable(activity_cursor)
                    else server_activity(activity_cursor, our_pids))
    except Exception as exc:
        where = f"{primary.get('host', 'local socket')}:{primary.get('port', 5432)}"
        errors.append(f'The database server {where} did not answer the pg_stat_activity '
                      f'query: {describe_error(exc)}')
        activity = None
    totals = dict(figures['totals'])
    if activity:
        totals['max_connections'] = activity['max_connections']
        totals['superuser_reserved'] = activity['superuser_reserved']
    return {
        'time': time.time(),
        'pid': os.getpid(),
        'active': active,
        'shared': totals.get('budget') is not None,
        'totals': totals,
        'history': figures['history'],
        'workers': figures['workers'],
        'servers': servers(primary, activity, errors),
        'databases': by_database(activity['rows']) if activity else [],
        'activity': activity['rows'] if activity else [],
        'settings': settings,
        'errors': errors,
        **(extra or {}),
    }
