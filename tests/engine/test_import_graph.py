"""The engine's imports, read from the source with ast: no cycle, and the layers only
import down: the top-level engine never imports observability/, cli/ or devtools/;
observability/ never imports cli/ or devtools/; nothing outside devtools/ imports it
(cli/ names the demo by its dotted path, loaded on demand); no Odoo import at module
level anywhere in the engine."""
import ast
import os

from testkit import ROOT

ENGINE = os.path.join(ROOT, 'odoo_pool_patch')
# a subpackage -> the subpackages it must never import ('' = the top-level engine)
NEVER = {'': {'observability', 'cli', 'devtools'}, 'observability': {'cli', 'devtools'},
         'cli': {'devtools'}}


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
    head = dotted.split('.')[0]
    return head if '.' in dotted and head in NEVER.keys() | {'devtools'} else ''


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


def upward(edges):
    return [f'{module} imports {dep}' for module, deps in sorted(edges.items())
            for dep in sorted(deps) if layer(dep) in NEVER.get(layer(module), set())]


def test_layers_only_import_down():
    assert not upward(graph())


# The top-level engine in layers, lowest first; a module imports only from its own layer
# or one below (at module level or inside a function). They are the subpackages to come
# (docs/architecture.rst); every top-level module must be in one.
ENGINE_LAYERS = (
    ('base', {'__init__', 'errors', 'dsn', 'faults', 'after_fork'}),
    ('config', {'options', 'conf_file', 'stock_options', 'conf_example', 'tls'}),
    ('sessions', {'conn_record', 'session_state', 'session_tracking', 'commit_marks'}),
    ('shared', {'shared_state', 'doorbell', 'backend_exit', 'budget', 'parking', 'exchange',
                'outage'}),
    ('pool', {'pool', 'pool_slots', 'pool_sessions', 'pool_sharing', 'pool_upkeep',
              'borrowers', 'maintenance'}),
    ('replicas', {'replicas', 'replica_health'}),
    ('odoo', {'odoo_install', 'list_dbs_cache', 'first_statement', 'request_retry',
              'replica_routes', 'runtime'}),
)


def engine_layer_violations(edges):
    rank = {module: index for index, (_, members) in enumerate(ENGINE_LAYERS)
            for module in members}
    name = {module: label for label, members in ENGINE_LAYERS for module in members}
    top = [module for module in edges if '.' not in module]
    wrong = [f'{module} is in no layer of ENGINE_LAYERS' for module in top if module not in rank]
    wrong += [f'{module} ({name[module]}) imports {dep} ({name[dep]})'
              for module in sorted(top) if module in rank
              for dep in sorted(edges[module]) if rank.get(dep, -1) > rank[module]]
    return wrong


def test_the_engine_modules_import_only_from_their_layer_or_below():
    edges = graph()
    assert not engine_layer_violations(edges)
    edges['options'] = edges['options'] | {'replicas'}     # the checker sees one
    edges['brand_new'] = set()
    assert engine_layer_violations(edges) == [
        'brand_new is in no layer of ENGINE_LAYERS', 'options (config) imports replicas (replicas)']


def test_the_engine_imports_odoo_only_inside_functions():
    found = modules()
    wrong = [f'{dotted}:{line} imports {target}'
             for dotted, path in found.items() if layer(dotted) != 'devtools'
             for target, line, top in imports(dotted, path)
             if top and (target == 'odoo' or target.startswith('odoo.'))]
    assert not wrong, wrong


def test_the_checker_sees_an_upward_import():
    """The checks above cannot pass by reading nothing: the engine's own graph is read,
    and an engine module importing cli/ would be reported."""
    edges = graph()
    assert 'pool_slots' in edges['pool'] and 'pool' in edges['devtools.demo']
    assert 'observability.instance_view' in edges['cli.top']
    edges['pool'] = edges['pool'] | {'cli.top'}
    assert upward(edges) == ['pool imports cli.top']
