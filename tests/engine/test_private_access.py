"""No module of the engine or the addon reads, writes or calls another module's
underscore attribute (checked on the source with ``ast``).

An attribute ``x._name`` (``x`` not ``self`` or ``cls``) is allowed in a module that
defines ``_name`` itself (a function, class or method of that name, an attribute it
assigns on ``self``/``cls`` or in a class body, a ``__slots__`` entry): the module's
own objects. Anything else is another module's private, reached into; the few that
belong to Odoo or the standard library (the cursor internals we wrap, the stock pool we
adopt) are listed below with the reason, and a listed one no longer used fails too.
"""
import ast
import pathlib

import odoo_pool_patch

ENGINE = pathlib.Path(odoo_pool_patch.__file__).parent
ADDON = ENGINE.parent / 'addons' / 'db_pooling'

ODOO_CURSOR = "Odoo's sql_db.Cursor internals, which first_statement and request_retry wrap"
# (module, attribute): whose it is and why we use it.
FOREIGN = {
    ('first_statement.py', '_cnx'): ODOO_CURSOR,
    ('first_statement.py', '_obj'): ODOO_CURSOR,
    ('first_statement.py', '_closed'): ODOO_CURSOR,
    ('first_statement.py', '_Cursor__pool'): ODOO_CURSOR + ' (the pool a cursor gives back to)',
    ('request_retry.py', '_cnx'): ODOO_CURSOR,
    ('request_retry.py', '_obj'): ODOO_CURSOR,
    ('request_retry.py', '_closed'): ODOO_CURSOR,
    ('request_retry.py', '_get_session_and_dbname'):
        "Odoo's http.Request: the session read again after a retried request",
    ('replica_routes.py', '_cnx'): ODOO_CURSOR + ' (a read-only session on 16/17)',
    ('odoo_install.py', '_connections'): "Odoo's stock ConnectionPool, adopted in place",
    ('odoo_install.py', '_maxconn'): "Odoo's stock ConnectionPool, adopted in place",
    ('pool.py', '_getframe'): 'sys._getframe: the borrow site, cheaper than inspect',
    ('replica_routes.py', '_getframe'): 'sys._getframe: who calls Registry.cursor',
    ('shared_state.py', '_is_owned'): "threading.RLock: whether this thread holds it after "
                                      "a signal interrupted its acquire",
    ('devtools/demo.py', '_exit'): 'os._exit: a forked demo child never returns into the demo',
}


def sources():
    """{relative name: source} of the engine and of the addon's Python (tests apart)."""
    found = {}
    for root, label in ((ENGINE, ''), (ADDON, 'addon/')):
        for path in sorted(root.rglob('*.py')):
            relative = path.relative_to(root)
            if 'tests' in relative.parts or 'build' in relative.parts:
                continue
            found[label + relative.as_posix()] = path.read_text()
    return found


def private(name):
    return name.startswith('_') and not name.startswith('__')


def defined(tree):
    """The underscore names a module defines itself."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    targets = item.targets if isinstance(item, ast.Assign) else \
                        [item.target] if isinstance(item, ast.AnnAssign) else []
                    for target in targets:
                        if isinstance(target, ast.Name):
                            names.add(target.id)
                            if target.id == '__slots__' and isinstance(
                                    item.value, (ast.Tuple, ast.List)):
                                names.update(elt.value for elt in item.value.elts
                                             if isinstance(elt, ast.Constant))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'):
            names.add(node.attr)
    return {name for name in names if private(name)}


def reaches(tree):
    """(line, attribute) of every ``x._name`` with ``x`` not ``self`` or ``cls``."""
    return [(node.lineno, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and private(node.attr) and
            not (isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'))]


def violations(found):
    """Reaches into another module's private, and the FOREIGN entries used."""
    wrong, used = [], set()
    for module, source in found.items():
        tree = ast.parse(source)
        own = defined(tree)
        for line, attr in reaches(tree):
            if attr in own:
                continue
            if (module, attr) in FOREIGN:
                used.add((module, attr))
                continue
            wrong.append(f'{module}:{line}: .{attr} is not defined in this module')
    return wrong, used


def test_no_module_reaches_into_another_modules_private_attribute():
    found = sources()
    assert 'pool.py' in found and 'addon/__init__.py' in found, sorted(found)
    wrong, _used = violations(found)
    assert not wrong, ('underscore attributes of other modules (give them a public name or '
                       'a method, or list a foreign one in FOREIGN with why):\n' +
                       '\n'.join(wrong))


def test_every_foreign_exception_is_still_used():
    _wrong, used = violations(sources())
    assert set(FOREIGN) <= used, f'stale FOREIGN entries: {sorted(set(FOREIGN) - used)}'


def test_the_check_sees_a_reach_into_another_module():
    """The checker itself: the accesses it must flag, and what it must let through."""
    found = {
        'pool.py': 'class P:\n    def __init__(self):\n        self._idle = {}\n'
                   '    def f(self, other):\n        return other._idle\n',
        'replicas.py': 'def choose(pool):\n    return pool._idle\n',
        'budget.py': 'def grant(state, cells):\n    state._reap_shared_locked(cells)\n',
        'exchange.py': 'def wrap(cnx):\n    cnx._dbp_key = 1\n',
    }
    wrong, _used = violations(found)
    assert [line.split(':')[0] for line in wrong] == ['replicas.py', 'budget.py', 'exchange.py']
