"""``odoo-pool top``: the live connection figures of a running instance, in the terminal.

Reads the instance's shared state (no lock taken, nothing written), so it can
watch a busy instance: the budget, who holds it, who waits, per process.
"""
import argparse
import glob
import os
import sys
import time

from ..observability import instance_view
from ..shared import shared_state as ss


def find_segments():
    return sorted(glob.glob(os.path.join(ss.private_directory(), 'state-*')))


def resolve_path(args):
    if args.path:
        return args.path
    if args.config:
        from ..config.conf_file import from_file
        from ..errors import ConfigError
        try:
            path = from_file(args.config).get('db_pool_shared_path')
        except ConfigError as exc:
            raise SystemExit(f'odoo-pool top: {exc}') from None
        if path:
            return str(path).strip()
    segments = find_segments()
    if len(segments) == 1:
        return segments[0]
    if not segments:
        raise SystemExit('odoo-pool top: no running instance found in /dev/shm: is Odoo running '
                         'with db_pooling server-wide? Give --path (db_pool_shared_path).')
    raise SystemExit('odoo-pool top: several instances found, choose one with --path:\n  '
                     + '\n  '.join(segments))


def longest_text(longest):
    if not longest:
        return ''
    return f"  {longest['age']:.1f}s {longest['database']} {longest['site']}"


def render(state):
    view = instance_view.read(state)
    lines = [
        f'budget {view.budget}  held {view.held}  in use {view.in_use}  '
        f'idle {view.idle} (parked {view.parked})  long-lived {view.long_lived}  '
        f'waiting {view.waiting}  cron reserve {view.cron_reserve}  '
        f'min idle {view.min_idle}',
        '',
        f'{"pid":>8} {"role":<8} {"held":>5} {"in use":>7} {"idle":>5} {"long":>5} '
        f'{"borrows":>9} {"reused":>8} {"opened":>7} {"waits":>6} {"timeouts":>9} {"shed":>6}  '
        f'longest borrow',
    ]
    for r in view.processes:
        lines.append(f'{r["pid"]:>8} {r["role"]:<8} {r["held"]:>5} {r["in_use"]:>7} '
                     f'{r["idle"]:>5} {r["long_lived"]:>5} {r["borrows"]:>9} {r["reused"]:>8} '
                     f'{r["opened"]:>7} {r["waits"]:>6} {r["timeouts"]:>9} {r["shed"]:>6}'
                     + longest_text(r['longest']))
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='odoo-pool top', description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', help='odoo.conf (for db_pool_shared_path)')
    parser.add_argument('--path', help='the shared state file (db_pool_shared_path)')
    parser.add_argument('--interval', type=float, default=1.0, help='seconds between refreshes')
    parser.add_argument('--once', action='store_true', help='print one snapshot and exit')
    args = parser.parse_args(argv)
    path = resolve_path(args)
    if not os.path.exists(path):
        raise SystemExit(f'odoo-pool top: {path} does not exist')
    try:
        state = ss.SharedState(path, create=False)
    except (ValueError, ss.SharedStateError) as exc:
        raise SystemExit(f'odoo-pool top: {exc}') from None
    try:
        while True:
            text = render(state)
            if args.once:
                print(text)
                return 0
            sys.stdout.write('\x1b[H\x1b[2J' + f'odoo-pool top  {path}  '
                             f'{time.strftime("%H:%M:%S")}\n\n' + text + '\n')
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        state.close()


if __name__ == '__main__':
    sys.exit(main())
