"""The engine's imports, read from the source with ast: no cycle, and the subpackages are
layers that only import down (LAYERS, written in docs/architecture.rst): nothing imports
cli/ or devtools/ but what is above them (cli/ names the demo by its dotted path, loaded on
demand); no Odoo import at module level anywhere in the engine but devtools/."""
import ast
import os

from testkit import ROOT

ENGINE = os.path.join(ROOT, 'odoo_pool_patch')
# The package's layers, lowest first: a module imports only from its own layer or one
# below (at module level or inside a function). ``base`` is the modules at the top of the
# package, BASE; every other module is in a subpackage named here.
LAYERS = ('base', 'config', 'sessions', 'shared', 'pool', 'replicas', 'odoo_glue',
          'observability', 'cli', 'devtools')
BASE = {'__init__', 'errors', 'dsn', 'faults', 'after_fork'}


def modules():
    """{dotted name under odoo_pool_patch: path}"""
    found = {}
    for where, _, names in os.walk(ENGINE):
        for name in names:
            if name.endswith('.py'):
                rel = os.path.relpath(os.path.join(where, name), ENGINE)[:-3]
                found[rel.replace(os.sep, '.')] = os.path.join(where, name)
    return found


def imports(dotted, path):
    """[(imported module, line, at module level)] of one module, inside the package."""
    package = dotted.split('.')[:-1]
    with open(path) as handle:
        tree = ast.parse(handle.read())
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith('odoo_pool_patch'):
                module = node.module[len('odoo_pool_patch'):].lstrip('.')
            else:
                out.append((node.module or '', node.lineno, id(node) in top_level))
                continue
            # each name: a submodule (from . import budget) or a name of the module
            targets = ['.'.join(filter(None, [module, alias.name])) for alias in node.names]
            out += [(t, node.lineno, id(node) in top_level) for t in targets]
        elif isinstance(node, ast.Import):
            out += [(alias.name.replace('odoo_pool_patch.', '', 1)
                     if alias.name.startswith('odoo_pool_patch.') else alias.name,
                     node.lineno, id(node) in top_level) for alias in node.names]
    return out


def graph():
    found = modules()
    edges = {}
    for dotted, path in found.items():
        deps = set()
        for target, _, _ in imports(dotted, path):
            while target and target not in found and target + '.__init__' not in found:
                target = target.rpartition('.')[0]      # a name imported from a module
            if target:
                deps.add(target if target in found else target + '.__init__')
        deps.discard(dotted)
        edges[dotted] = deps
    return edges


def layer(dotted):
    """A module's layer: its subpackage, or ``base`` for a module at the top."""
    return dotted.split('.')[0] if '.' in dotted else 'base'


def test_no_import_cycle():
    edges, cycles, state = graph(), [], {}

    def visit(node, stack):
        state[node] = 'open'
        for dep in sorted(edges[node]):
            if state.get(dep) == 'open':
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 'done'
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert len(edges) > 30 and not cycles, cycles


def layer_violations(edges):
    rank = {name: index for index, name in enumerate(LAYERS)}
    wrong = [f'{module} is in no layer of LAYERS' for module in sorted(edges)
             if layer(module) not in rank or (layer(module) == 'base' and module not in BASE)]
    wrong += [f'{module} ({layer(module)}) imports {dep} ({layer(dep)})'
              for module in sorted(edges) if layer(module) in rank
              for dep in sorted(edges[module]) if rank.get(layer(dep), -1) > rank[layer(module)]]
    return wrong


def test_the_layers_only_import_down():
    assert not layer_violations(graph())


def test_the_checker_sees_an_upward_import():
    """The check cannot pass by reading nothing: the engine's own graph is read, and an
    upward import is reported."""
    edges = graph()
    assert 'pool.slots' in edges['pool.connection_pool']
    assert 'pool.connection_pool' in edges['devtools.demo']
    assert 'observability.instance_view' in edges['cli.top']
    edges['config.options'] = edges['config.options'] | {'replicas.router'}
    edges['pool.connection_pool'] = edges['pool.connection_pool'] | {'cli.top'}
    assert layer_violations(edges) == [
        'config.options (config) imports replicas.router (replicas)',
        'pool.connection_pool (pool) imports cli.top (cli)']


def test_the_checker_sees_a_module_in_no_layer():
    """A new module at the top of the package (not in BASE) or in a subpackage that is no
    layer is reported: it must be given its place."""
    edges = graph()
    edges['brand_new'] = set()
    edges['extras.thing'] = set()
    assert layer_violations(edges) == [
        'brand_new is in no layer of LAYERS', 'extras.thing is in no layer of LAYERS']


def test_the_engine_imports_odoo_only_inside_functions():
    found = modules()
    wrong = [f'{dotted}:{line} imports {target}'
             for dotted, path in found.items() if layer(dotted) != 'devtools'
             for target, line, top in imports(dotted, path)
             if top and (target == 'odoo' or target.startswith('odoo.'))]
    assert not wrong, wrong
