"""No module of the engine or the addon reads, writes or calls another module's
underscore attribute (checked on the source with ``ast``).

What counts as reaching in, ``_name`` being an underscore name (not a dunder):

- ``x._name``, ``getattr(x, '_name')`` (hasattr, setattr, delattr, ``vars(x).get``) with
  ``x`` not ``self``/``cls``, where this module does not define ``_name`` itself (a
  module-level function or class, a class member or ``__slots__`` entry, an attribute its
  methods assign on ``self``/``cls``): ``ast`` does not know ``x``'s type, so a name is
  taken as the module's own when it defines one;
- ``<owner>._name`` where ``<owner>`` names an object of another of our modules (``pool``,
  ``budget``, ``exchange``, ``parking``, ``state``, ``router``, ``outages``), even when
  this module defines a ``_name`` of its own (``_lock`` is in several);
- ``self._name`` in a function that is no method of a class of this module: a function
  installed on someone else's class (Odoo's), so ``self`` is theirs;
- ``from <module> import _name``.

The few that belong to Odoo or the standard library are listed in FOREIGN with the
reason; a listed one no longer used fails too.
"""
import ast
import pathlib

import odoo_pool_patch

ENGINE = pathlib.Path(odoo_pool_patch.__file__).parent
ADDON = ENGINE.parent / 'addons' / 'db_pooling'

ODOO_CURSOR = "Odoo's sql_db.Cursor internals, which first_statement and request_retry wrap"
STOCK_POOL = "Odoo's stock ConnectionPool, adopted in place"
# (module, attribute): whose it is and why we use it.
FOREIGN = {
    ('odoo_glue/first_statement.py', '_cnx'): ODOO_CURSOR,
    ('odoo_glue/first_statement.py', '_obj'): ODOO_CURSOR,
    ('odoo_glue/first_statement.py', '_closed'): ODOO_CURSOR,
    ('odoo_glue/first_statement.py', '_Cursor__pool'):
        ODOO_CURSOR + ' (the pool a cursor gives back to)',
    ('odoo_glue/first_statement.py', '_close'): ODOO_CURSOR + ' (wrapped: see _install_rollback)',
    ('odoo_glue/first_statement.py', '_now'): ODOO_CURSOR + ' (cleared as its stock rollback does)',
    ('odoo_glue/first_statement.py', '_dbp_closing'):
        "our mark on Odoo's cursor while its _close runs",
    ('odoo_glue/request_retry.py', '_cnx'): ODOO_CURSOR,
    ('odoo_glue/request_retry.py', '_obj'): ODOO_CURSOR,
    ('odoo_glue/request_retry.py', '_closed'): ODOO_CURSOR,
    ('odoo_glue/request_retry.py', '_get_session_and_dbname'):
        "Odoo's http.Request: the session read again after a retried request",
    ('odoo_glue/replica_routes.py', '_cnx'): ODOO_CURSOR + ' (a read-only session on 16/17)',
    ('odoo_glue/odoo_install.py', '_connections'): STOCK_POOL,
    ('odoo_glue/odoo_install.py', '_maxconn'): STOCK_POOL,
    ('odoo_glue/odoo_install.py', '_readonly'): STOCK_POOL,
    ('odoo_glue/odoo_install.py', '_pool_in_use'):
        "Odoo 19's stock pool marks its connections in use",
    ('odoo_glue/replica_routes.py', '_Pool_readonly'): "Odoo 18+'s read-only pool, in odoo.sql_db",
    ('odoo_glue/replica_routes.py', '_db_readonly_failed_time'):
        "Odoo 18+'s Registry: when its replica failed (the ban ends after ban_time)",
    ('shared/exchange.py', '_psycopg'):
        "psycopg2's C extension: the libpq it is linked to (GSSAPI encryption is asked of it)",
    ('pool/borrowers.py', '_getframe'): 'sys._getframe: the borrow site, cheaper than inspect',
    ('odoo_glue/replica_routes.py', '_getframe'): 'sys._getframe: who calls Registry.cursor',
    ('shared/shared_state.py', '_is_owned'):
        "threading.RLock: whether this thread holds it after a signal interrupted its acquire",
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
    return isinstance(name, str) and name.startswith('_') and not name.startswith('__')


# Receivers that name an object of one of our modules: (name, the module that owns it).
OWNERS = {'pool': 'pool/connection_pool.py', 'budget': 'shared/budget.py',
          'exchange': 'shared/exchange.py', 'parking': 'shared/parking.py',
          'state': 'shared/shared_state.py', 'router': 'replicas/router.py',
          'outages': 'shared/outage.py'}
STRING_ACCESS = ('getattr', 'hasattr', 'setattr', 'delattr')


def defined(tree):
    """The underscore names a module defines itself."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(item.name)
            targets = item.targets if isinstance(item, ast.Assign) else \
                [item.target] if isinstance(item, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == '__slots__' and isinstance(item.value, (ast.Tuple, ast.List)):
                        names.update(elt.value for elt in item.value.elts
                                     if isinstance(elt, ast.Constant))
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'):
                names.add(node.attr)
    return {name for name in names if private(name)}


def receiver_name(node):
    """The last name of an expression: ``pool`` for ``pool`` and ``self.pool``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def methods(tree):
    """The function nodes that are methods of a class of the module (nested ones too)."""
    found = set()
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(id(node) for node in ast.walk(item)
                             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.Lambda)))
    return found


def accesses(tree):
    """(line, attribute, receiver, kind) of every underscore access: kind 'attr' (``x._a``,
    receiver the node), 'string' (getattr & co.), 'self-outside' (``self._a`` outside our
    classes), 'import'."""
    own_methods = methods(tree)
    found = []

    def visit(node, in_method):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_method = id(node) in own_methods
        if isinstance(node, ast.Attribute) and private(node.attr):
            selfish = isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls')
            if not selfish:
                found.append((node.lineno, node.attr, node.value, 'attr'))
            elif not in_method and in_method is not None:
                found.append((node.lineno, node.attr, node.value, 'self-outside'))
        elif isinstance(node, ast.Call):
            func = node.func
            target = None
            if isinstance(func, ast.Name) and func.id in STRING_ACCESS and len(node.args) >= 2:
                target, name = node.args[0], node.args[1]
            elif isinstance(func, ast.Attribute) and func.attr == 'get' and node.args and \
                    isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name) \
                    and func.value.func.id == 'vars' and func.value.args:
                target, name = func.value.args[0], node.args[0]
            if target is not None and isinstance(name, ast.Constant) and private(name.value):
                selfish = isinstance(target, ast.Name) and target.id in ('self', 'cls')
                if not selfish or not in_method:
                    found.append((node.lineno, name.value, target, 'string'))
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.lineno, alias.name, None, 'import')
                         for alias in node.names if private(alias.name))
        for child in ast.iter_child_nodes(node):
            visit(child, in_method)

    visit(tree, None)
    return found


def violations(found):
    """Reaches into another module's private, and the FOREIGN entries used."""
    wrong, used = [], set()
    for module, source in found.items():
        tree = ast.parse(source)
        own = defined(tree)
        for line, attr, receiver, kind in accesses(tree):
            owner = OWNERS.get(receiver_name(receiver)) if receiver is not None else None
            if (module, attr) in FOREIGN:
                used.add((module, attr))
                continue
            if kind in ('attr', 'string') and attr in own and owner in (None, module):
                continue
            wrong.append(f'{module}:{line}: {attr} ({kind}'
                         f'{", of " + owner if owner else ""}) is not defined in this module')
    return wrong, used


def test_no_module_reaches_into_another_modules_private_attribute():
    found = sources()
    assert 'pool/connection_pool.py' in found and 'addon/__init__.py' in found, sorted(found)
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
        'pool/connection_pool.py': 'class P:\n    def __init__(self):\n        self._idle = {}\n'
                                   '    def f(self, other):\n        return other._idle, self._idle\n',
        'replicas/router.py': 'def choose(pool):\n    return pool._idle\n',
        'shared/budget.py': 'def grant(state, cells):\n    state._reap_shared_locked(cells)\n',
        'shared/exchange.py': 'class X:\n    def __init__(self):\n        self._lock = 1\n'
                              'def f(cnx, pool):\n    cnx._dbp_key = 1\n    return pool._lock\n',
        'shared/outage.py': 'def f(cnx):\n    return getattr(cnx, "_dbp_key", None)\n',
        'odoo_glue/odoo_install.py': 'def patch(cls):\n    def run(self):\n'
                                     '        return self._x\n    cls.run = run\n',
        'config/tls.py': 'from .options import _seconds\n',
    }
    wrong, _used = violations(found)
    assert sorted(line.split(':')[0] for line in wrong) == [
        'config/tls.py', 'odoo_glue/odoo_install.py', 'replicas/router.py', 'shared/budget.py',
        'shared/exchange.py', 'shared/exchange.py', 'shared/outage.py'], wrong
