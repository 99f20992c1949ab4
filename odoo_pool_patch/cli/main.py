"""``odoo-pool``: command-line entry point.

    odoo-pool demo     watch the pool against stock Odoo's policy (starts its own PostgreSQL)
    odoo-pool top      live figures of a running instance, from its shared state
    odoo-pool check    validate an odoo.conf: options, TLS files, servers, budget
"""
import sys

COMMANDS = {
    'demo': ('odoo_pool_patch.devtools.demo', 'run the demo: stock policy against db_pooling, side by side'),
    'top': ('odoo_pool_patch.cli.top', 'live connection figures of a running instance'),
    'check': ('odoo_pool_patch.cli.check', 'validate an odoo.conf without starting Odoo'),
}


def usage():
    lines = ['usage: odoo-pool COMMAND [options]', '', 'commands:']
    lines += [f'  {name:<8} {text}' for name, (_, text) in COMMANDS.items()]
    return '\n'.join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f'odoo-pool: unknown command {argv[0]!r}\n\n{usage()}', file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])

