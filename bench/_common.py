"""What the benchmarks share: server-side counters, percentiles, the table and the JSON file."""
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'bench', 'results')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class ServerCounters:
    """One persistent admin connection (so sampling opens no sessions of its own)
    reading the server connections of ``user`` and the sessions opened per database."""

    def __init__(self, cluster, user='odoo'):
        self.cnx = cluster.connect('postgres', application_name='dbpool-bench-sampler')
        self.user = user

    def _rows(self, query, params=()):
        with self.cnx.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def connections(self, application_name_like='%'):
        """Client backends of ``user`` (whose application_name is like the pattern)."""
        return self._rows("SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                          "AND backend_type = 'client backend' AND application_name LIKE %s",
                          [self.user, application_name_like])[0][0]

    def sessions(self):
        """{database: sessions established since the server started} (PostgreSQL 14+)."""
        self._rows('SELECT pg_stat_clear_snapshot()')
        return dict(self._rows('SELECT datname, sessions FROM pg_stat_database '
                               'WHERE datname IS NOT NULL'))

    def close(self):
        self.cnx.close()


TICK = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def _stat(pid):
    """(ppid, pgrp, utime + stime in seconds) of a process, None if it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / TICK


def _processes():
    """(pid, (ppid, pgrp, CPU seconds)) of every process still there."""
    for name in os.listdir('/proc'):
        if name.isdigit():
            stat = _stat(name)
            if stat:
                yield int(name), stat


def cpu_seconds(groups=(), parents=(), pids=()):
    """{pid: CPU seconds} of the processes of the process ``groups`` (an Odoo server
    started in a session of its own), the children of ``parents`` (a postmaster's
    backends) and ``pids`` (PgBouncer)."""
    return {pid: stat[2] for pid, stat in _processes()
            if stat[1] in groups or stat[0] in parents or pid in pids}


def thread_seconds(groups=()):
    """{(pid, tid): CPU seconds} of every thread of the processes of the process
    ``groups`` (see :class:`CpuMeter`'s ``side_threads``)."""
    found = {}
    for pid, stat in _processes():
        if stat[1] not in groups:
            continue
        try:
            tids = os.listdir(f'/proc/{pid}/task')
        except OSError:
            continue
        for tid in tids:
            task = _stat(f'{pid}/task/{tid}')
            if task:
                found[(pid, int(tid))] = task[2]
    return found


def cpu_used(before, after):
    """CPU seconds between two :func:`cpu_seconds` readings: what the processes alive at
    the end used since the first reading (all of it for those started since); a
    process that ended between the two is left out."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


class CpuMeter:
    """CPU seconds used by the processes :func:`cpu_seconds` finds, between
    :meth:`start` and :meth:`stop`, read every ``interval`` s meanwhile so that a
    process that ends (a backend closed by a pool) counts up to its last reading."""

    def __init__(self, interval=0.2, side_threads=False, **which):
        import threading
        self.which, self.interval = which, interval
        # side_threads: only the threads of the processes of ``groups`` other than the
        # busiest of each process. An Odoo prefork worker serves requests on one thread
        # (its main thread waits in join), so these are the threads db_pooling starts
        # (maintenance, the exchange's listener) and whatever else a module starts.
        self.side_threads = side_threads
        self.read = thread_seconds if side_threads else cpu_seconds
        self.first, self.last = {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self, baseline=False):
        for pid, used in self.read(**self.which).items():
            self.first.setdefault(pid, used if baseline else 0.0)   # new since: from 0
            self.last[pid] = used

    def _run(self):
        while not self._stop.wait(self.interval):
            self._read()

    def start(self):
        self._read(baseline=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._read()
        used = {key: last - self.first[key] for key, last in self.last.items()}
        if not self.side_threads:
            return sum(used.values())
        busiest = {}
        for (pid, _tid), seconds in used.items():
            busiest[pid] = max(busiest.get(pid, 0.0), seconds)
        return sum(used.values()) - sum(busiest.values())


def postmaster_pid(cluster):
    with open(os.path.join(cluster.datadir, 'postmaster.pid')) as handle:
        return int(handle.readline())


def sessions_opened(before, after, sampler_database='postgres', sampler_sessions=0):
    """{database: new sessions} between two :meth:`ServerCounters.sessions` readings."""
    opened = {db: after[db] - before.get(db, 0) for db in after}
    opened[sampler_database] = opened.get(sampler_database, 0) - sampler_sessions
    return {db: n for db, n in sorted(opened.items()) if n > 0}


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def latency_figures(latencies, seconds):
    """Throughput and p50/p99 in milliseconds of a list of seconds."""
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return {'done': len(latencies), 'per_s': len(latencies) / seconds if seconds else 0,
            'p50_ms': p50 * 1000 if p50 is not None else None,
            'p99_ms': p99 * 1000 if p99 is not None else None}


def print_table(columns, rows):
    """``columns``: [(key, title, format)]; rows: dicts (a missing or None value prints n/a)."""
    widths = [max(len(title), 8) + 2 for _, title, _ in columns]
    widths[0] = max([len(str(r.get(columns[0][0], ''))) for r in rows] + [len(columns[0][1])]) + 2
    print(''.join(f'{title:>{w}}' if i else f'{title:<{w}}'
                  for i, ((_, title, _), w) in enumerate(zip(columns, widths))))
    for row in rows:
        cells = []
        for i, ((key, _, fmt), width) in enumerate(zip(columns, widths)):
            value = row.get(key)
            text = 'n/a' if value is None else format(value, fmt)
            cells.append(f'{text:<{width}}' if i == 0 else f'{text:>{width}}')
        print(''.join(cells))


def write_json(name, payload, path=None):
    path = path or os.path.join(RESULTS, f'{name}.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = dict(payload, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                   machine=machine(), command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    with open(path, 'w') as handle:
        json.dump(payload, handle, indent=1)
    print(f'\nwritten to {os.path.relpath(path, ROOT)}')
    return path


def machine():
    load = os.getloadavg()
    return (f'{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python '
            f'{platform.python_version()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}')


def stock_pool_class(no_odoo=False):
    """(Odoo's ConnectionPool class, series), or (None, None). Without Odoo importable,
    re-runs the calling script under the interpreter of the tree found (ODOO_PATH
    first, else the newest /opt/odoo tree), so the stock arms use the real thing."""
    if no_odoo:
        return None, None
    try:
        from odoo import release, sql_db
        return sql_db.ConnectionPool, release.serie
    except ImportError:
        from odoo_pool_patch.devtools.odoo_runner import available_trees
        trees, _ = available_trees()
        if not trees or os.environ.get('DBPOOL_BENCH_REEXEC'):
            return None, None
        tree = trees[0] if os.environ.get('ODOO_PATH') else trees[-1]
        os.execve(tree.python, [tree.python, sys.argv[0], *sys.argv[1:]],
                  tree.env({'DBPOOL_BENCH_REEXEC': '1'}))


def merge_rounds(label, runs, worst=('peak', 'at_rest'),
                 total=('errors', 'requests', 'done', 'http_requests'),
                 mean=('mean', 'per_s', 'p50_ms', 'p99_ms', 'wait_p50_ms', 'wait_p99_ms',
                       'new_per_s', 'postgres_per_s', 'odoo_cpu_us', 'side_cpu_us', 'cpu_us'),
                 also_worst=('wait_max_ms',),
                 counts=('sessions_opened', 'error_kinds', 'pool')):
    """One row per arm over its rounds: the worst of ``worst``, sums of ``total`` and of
    the per-key ``counts``, medians of ``mean`` (the middle round's figure: one slow
    round of a noisy machine does not move it); the runs themselves under ``runs``."""
    if not runs:
        return {'arm': label}
    row = {'arm': label, 'rounds': len(runs)}
    for key in worst + also_worst:
        if key in runs[0]:
            row[key] = max((r[key] for r in runs if r[key] is not None), default=None)
    for key in total:
        if key in runs[0]:
            row[key] = sum(r[key] for r in runs)
    for key in mean:
        values = sorted(r[key] for r in runs if r.get(key) is not None)
        if key in runs[0]:
            middle = len(values) // 2
            row[key] = (None if not values else values[middle] if len(values) % 2
                        else (values[middle - 1] + values[middle]) / 2)
    for name in counts:
        row[name] = {}
        for run in runs:
            for key, n in run.get(name, {}).items():
                row[name][key] = row[name].get(key, 0) + n
    row['runs'] = [{k: v for k, v in r.items() if k != 'samples'} for r in runs]
    return row


def interleaved(labels, rounds, run):
    """{label: [run(label, number) for each round]}: every arm ``rounds`` times, each round
    starting one arm later, so that the arms share the machine's noise."""
    results = {label: [] for label in labels}
    for number in range(rounds if labels else 0):
        shift = number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            results[label].append(run(label, number))
    return results


def report_rounds(columns, results, rounds):
    """Print every round (when there are several) and one row per arm (see
    :func:`merge_rounds`); returns those rows."""
    rows = [merge_rounds(label, runs) for label, runs in results.items()]
    if rounds > 1:
        print('\nEvery round:')
        print_table([('round', 'round', 'd')] + columns,
                    [dict(runs[number], round=number + 1) for number in range(rounds)
                     for runs in results.values() if len(runs) > number])
        print(f'\nMedians over {rounds} rounds (peak and at rest: the highest):')
    print()
    print_table(columns, rows)
    return rows


def odoo_tree(path=None):
    """(tree, why not): the Odoo tree a benchmark runs on: ``path`` (--odoo), else
    ODOO_PATH, else the newest /opt/odoo tree; (None, reason) when there is none."""
    from odoo_pool_patch.devtools.odoo_runner import available_trees, find_odoo
    if path:
        return find_odoo(path), ''
    trees, why_not = available_trees()
    if not trees:
        return None, why_not
    return (trees[0] if os.environ.get('ODOO_PATH') else trees[-1]), ''
