"""README.rst, docs/, odoo.conf.example and the wheel stay true to the code."""
import os
import re
import subprocess
import sys
import zipfile

import pytest

from odoo_pool_patch.config.conf_example import documented_names
from odoo_pool_patch.config.conf_example import example_file
from odoo_pool_patch.config.options import OPTION_NAMES

from testkit import FOLDER_MARKERS, ROOT



def read(name):
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read()


def test_ci_runs_the_readme_test_command():
    command = re.search(r'^TEST_COMMAND="(.*)"$', read('.ci/run'), re.M).group(1)
    assert '    ' + command + '\n' in read('README.rst')


def test_readme_demo_command_is_the_cli():
    assert '    python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/odoo-pool demo\n' \
        in read('README.rst')


def options_read_in_code():
    """db_* option names (and the worker counts) quoted in the engine and the addon."""
    names = set()
    for directory in ('odoo_pool_patch', 'addons/db_pooling'):
        for base, _, files in os.walk(os.path.join(ROOT, directory)):
            for name in files:
                if name.endswith('.py') and name not in CODE_THAT_STARTS_ODOO:
                    with open(os.path.join(base, name)) as handle:
                        names.update(re.findall(
                            r"""['"](db_[a-z0-9_]*[a-z0-9]|workers|max_cron_threads)['"]""",
                            handle.read()))
    from odoo_pool_patch.config.options import GROUP_PREFIXES
    # db_pooling* are our own names (the module, session keys), not options
    return {n for n in names if not n.startswith('db_pooling')} - set(GROUP_PREFIXES)


# modules that pass options to the Odoo servers they start (tests, demo), not read them
CODE_THAT_STARTS_ODOO = ('odoo_runner.py', 'demo.py', 'embedded_pg.py')


def test_odoo_conf_example_lists_exactly_the_options_read():
    example = read('odoo.conf.example')
    # regenerate: python -m odoo_pool_patch.config.conf_example > odoo.conf.example
    assert example == example_file()
    # an option line is "[; ]name = [one-word value]" (doc text may say "name = value, ...")
    listed = set(re.findall(r'^;? ?(\w+) =(?: \S*)?$', example, re.M))
    assert listed == documented_names()
    assert set(OPTION_NAMES) <= listed
    read_in_code = options_read_in_code()
    assert {'db_pool_wait_timeout', 'db_maxconn', 'workers'} <= read_in_code   # the scan works
    assert read_in_code <= listed, 'read by the code but not in odoo.conf.example (add them ' \
        'to stock_options.STOCK_OPTIONS or options.OPTIONS)'


def test_every_option_has_a_group_and_docs_have_the_generated_reference():
    from odoo_pool_patch.config.conf_example import GROUP_KEYS, reference_rst
    from odoo_pool_patch.config.options import OPTIONS, group_of
    assert all(option.group in GROUP_KEYS for option in OPTIONS)
    assert group_of('db_pool_statement_timeout_cron') == 'pgbouncer'   # longest prefix wins
    assert group_of('db_replica_sslrootcert') == 'tls'
    assert group_of('db_pool_some_new_knob') == 'pool'
    with pytest.raises(ValueError, match='GROUP_PREFIXES'):
        group_of('unrelated_option')
    # regenerate:
    #   python -m odoo_pool_patch.config.conf_example --reference-into docs/configuration.rst
    assert read('docs/configuration.rst').endswith(reference_rst())


def test_stock_options_documented_are_odoo_options():
    from odoo_pool_patch.config.stock_options import STOCK_OPTIONS
    from odoo_pool_patch.devtools.odoo_runner import available_trees
    trees = [tree for tree in available_trees()[0] if tree.major >= 18]
    if not trees:
        pytest.skip('no Odoo 18+ tree found (ODOO_PATH or /opt/odoo/<series>)')
    for tree in trees:
        source = open(os.path.join(tree.path, 'odoo', 'tools', 'config.py')).read()
        for option in STOCK_OPTIONS:
            if tree.major < option.since:
                continue
            assert re.search(rf"""['"]{option.name}['"]|--{option.name}\b""", source), \
                (tree.series, option.name)


def test_reference_has_one_section_per_option():
    """docs/configuration.rst: a section titled ``name`` for each option read, and no other."""
    text = read('docs/configuration.rst')
    reference = text[text.index('\nReference\n=========\n'):]
    sections = re.findall(r'^``(\w+)``\n~+\n', reference, re.M)
    assert len(sections) == len(set(sections))
    assert set(sections) == documented_names()
    assert set(OPTION_NAMES) <= set(sections)
    for name in sections:
        body = reference[reference.index(f'``{name}``\n~'):].split('\n~', 2)[1]
        assert ':Group:' in body and ':Default:' in body, name


def test_readme_is_short_and_links_to_pages_that_exist():
    readme = read('README.rst')
    assert len(readme.splitlines()) < 300
    links = set(re.findall(r'<((?:docs/)?[\w.-]+\.rst)(?:#[\w-]+)?>`__', readme))
    assert 'docs/configuration.rst' in links and 'docs/troubleshooting.rst' in links
    for page in os.listdir(os.path.join(ROOT, 'docs')):
        if page.endswith('.rst'):
            assert 'docs/' + page in links, f'README.rst does not link to docs/{page}'
            for target in re.findall(r'<([\w.-]+\.rst)(?:#[\w-]+)?>`__', read('docs/' + page)):
                assert os.path.exists(os.path.join(ROOT, 'docs', target)), (page, target)
    for target in links:
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_readme_and_docs_are_valid_restructuredtext():
    docutils_core = pytest.importorskip('docutils.core')
    import io
    pages = ['README.rst'] + ['docs/' + name for name in sorted(os.listdir(os.path.join(ROOT, 'docs')))
                              if name.endswith('.rst')]
    pages += ['addons/db_pooling/readme/' + name for name in
              sorted(os.listdir(os.path.join(ROOT, 'addons/db_pooling/readme')))]
    for page in pages:
        warnings = io.StringIO()
        docutils_core.publish_doctree(read(page), source_path=page, settings_overrides={
            'report_level': 2, 'halt_level': 5, 'warning_stream': warnings})
        assert not warnings.getvalue(), warnings.getvalue()


def test_readme_minimal_conf_says_the_defaults():
    """The README's odoo.conf example: Odoo's options in [options], db_pooling's in
    [db_pooling], where the commented lines give the defaults."""
    from odoo_pool_patch.config.conf_file import NAMES
    from odoo_pool_patch.odoo_glue.odoo_install import default_budget
    from odoo_pool_patch.config.options import OPTIONS, load_settings
    readme = read('README.rst')
    block = readme[readme.index('\nA minimal odoo.conf\n'):]
    block = block[block.index('::\n\n') + 4:]
    block = block[:re.search(r'^\S', block, re.M).start()].rstrip('\n')
    sections = {}
    for line in block.splitlines():
        if line.startswith('    ['):
            section = sections.setdefault(line.strip()[1:-1], {'active': {}, 'commented': {}})
        elif line:
            key = 'commented' if line[4:].startswith(';') else 'active'
            section[key].update([re.fullmatch(r';? ?(\w+) = (.*)', line[4:]).groups()])
    assert list(sections) == ['options', 'db_pooling']
    active, commented = sections['options']['active'], sections['db_pooling']['commented']
    assert not sections['options']['commented'] and not sections['db_pooling']['active']
    assert set(active) <= documented_names() - set(NAMES) and set(commented) <= set(NAMES)
    assert 'db_pooling' in active['server_wide_modules'].split(',')
    settings = load_settings(commented.get)
    defaults = {option.name: option.default for option in OPTIONS}
    budget = default_budget(int(active['workers']), int(active['max_cron_threads']), 64)
    for name in commented:
        value = getattr(settings, next(o.field for o in OPTIONS if o.name == name))
        assert value == (budget if name == 'db_pool_max_connections' else defaults[name]), name


def manifest():
    import ast
    return ast.literal_eval(read('addons/db_pooling/__manifest__.py'))


def test_one_version_for_the_distribution_and_the_addon():
    """odoo_pool_patch.__version__ (x.y.z) is the version: pyproject.toml reads it and the
    manifest says the same (Odoo prefixes the series)."""
    from odoo_pool_patch import __version__
    pyproject = read('pyproject.toml')
    assert re.fullmatch(r'\d+\.\d+\.\d+', __version__)
    project = pyproject[pyproject.index('\n[project]\n'):]
    assert not re.search(r'^version\s*=', project[:project.index('\n[', 1)], re.M)
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert re.search(r'^version = \{attr = "odoo_pool_patch.__version__"\}$', pyproject, re.M)
    assert manifest()['version'] == __version__


def test_the_manifest_names_the_distribution():
    """external_dependencies names the distribution (what Odoo 16-19 look up first, by its
    normalized name), which is also the package Odoo imports (its fallback)."""
    from odoo_pool_patch.devtools.odoo_runner import DISTRIBUTION
    name = re.search(r'^name = "([^"]+)"$', read('pyproject.toml'), re.M).group(1)
    assert name == DISTRIBUTION

    def normalized(text):
        return re.sub(r'[-_.]+', '-', text).lower()
    assert [normalized(dep) for dep in manifest()['external_dependencies']['python']] \
        == [normalized(name)] == [normalized('odoo_pool_patch')]


def test_odoo_finds_the_distribution_and_reads_the_version(odoo_tree):
    """Each Odoo's own check of the manifest's external dependency and version, run by its
    interpreter with the PYTHONPATH odoo_runner gives the servers of the demo and tests: the
    distribution is found (no "does not appear to be a valid PyPI package" fallback) and the
    version reads <series>.x.y.z."""
    from odoo_pool_patch import __version__
    from odoo_pool_patch.devtools.odoo_runner import distribution_metadata
    if odoo_tree is None:
        pytest.skip('no Odoo source tree (ODOO_PATH or /opt/odoo/<series>)')
    script = (
        'import ast, logging, sys\n'
        'logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(levelname)s '
        '%(message)s")\n'
        'from odoo.modules import module\n'
        'manifest = ast.literal_eval(open(sys.argv[1]).read())\n'
        'for dependency in manifest["external_dependencies"]["python"]:\n'
        '    module.check_python_external_dependency(dependency)\n'
        'print("VERSION", module.adapt_version(manifest["version"]))\n'
        'import importlib.metadata\n'
        'print("FROM", importlib.metadata.distribution("odoo_pool_patch").locate_file(""))\n')
    proc = subprocess.run([odoo_tree.python, '-c', script,
                           os.path.join(ROOT, 'addons/db_pooling/__manifest__.py')],
                          env=odoo_tree.env(), cwd=odoo_tree.path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f'VERSION {odoo_tree.series}.{__version__}\n' in proc.stdout
    assert f'FROM {distribution_metadata()}\n' in proc.stdout
    assert 'does not appear' not in proc.stdout + proc.stderr, proc.stdout


def test_wheel_ships_engine_and_addon(tmp_path):
    from odoo_pool_patch import __version__
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                    '-w', str(tmp_path), ROOT], check=True, capture_output=True)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith('.whl'))
    assert wheel.startswith(f'odoo_pool_patch-{__version__}-')
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    metadata = zipfile.ZipFile(tmp_path / wheel).read(
        f'odoo_pool_patch-{__version__}.dist-info/METADATA').decode()
    assert 'Name: odoo-pool-patch\n' in metadata and f'Version: {__version__}\n' in metadata
    engine = os.path.join(ROOT, 'odoo_pool_patch')
    modules = {os.path.relpath(os.path.join(where, name), ROOT)
               for where, _, files in os.walk(engine) for name in files if name.endswith('.py')}
    assert modules and modules <= set(names), modules - set(names)   # subpackages included
    assert 'odoo/addons/db_pooling/__manifest__.py' in names
    assert 'odoo/addons/db_pooling/controllers/status.py' in names
    assert 'odoo/addons/db_pooling/views/dashboard_views.xml' in names
    assert 'odoo/addons/db_pooling/static/src/dashboard/dashboard.js' in names
    assert not any(n in names for n in ('odoo/__init__.py', 'odoo/addons/__init__.py'))


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', '--help'],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and 'demo' in out.stdout
    bad = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'nope'],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_simulated_demo_shows_stock_keeping_and_us_releasing(tmp_path):
    env = dict(os.environ, ODOO_PATH='')
    out = subprocess.run([sys.executable, '-m', 'odoo_pool_patch.cli', 'demo', '--simulated',
                          '--workers', '3', '--databases', '2', '--seconds', '3', '--rest', '5',
                          '--idle-timeout', '1'],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {arm: (int(peak), int(rest)) for arm, peak, rest in re.findall(
        r'^(stock|per-proc|shared)\s+(\d+)\s+[\d.]+\s+(\d+)$', out.stdout, re.M)}
    assert rows['stock'][1] >= 2            # stock keeps its idle connections
    assert rows['per-proc'][1] == 0         # ours closed them after the idle timeout
    assert rows['shared'][0] <= 3 + 4       # the shared budget: workers + 4
    assert rows['shared'][1] <= 1           # db_pool_min_idle


def test_tls_options_documented():
    from odoo_pool_patch.config.tls import KEYWORDS
    example, page = read('odoo.conf.example'), read('docs/tls.rst')
    for suffix in KEYWORDS:
        assert f'; db_{suffix} =' in example and f'; db_replica_{suffix} =' in example
        assert f'db_{suffix}' in page and f'db_replica_{suffix}' in page


def test_architecture_page_names_every_engine_module():
    """Every module, by its path in the package (``pool/slots.py``, ``errors.py``)."""
    page = read('docs/architecture.rst')
    engine = os.path.join(ROOT, 'odoo_pool_patch')
    for where, _, names in os.walk(engine):
        for name in sorted(names):
            if name.endswith('.py') and name not in ('__init__.py', '__main__.py'):
                path = os.path.relpath(os.path.join(where, name), engine)
                assert f'``{path}``' in page, f'docs/architecture.rst: add {path} to the module map'


def test_every_test_module_is_in_a_folder_that_is_a_registered_marker():
    """tests/<folder>/test_*.py, the folder one of testkit.FOLDER_MARKERS, each
    registered in pyproject.toml (``--strict-markers`` fails a run on an unknown one)."""
    registered = re.findall(r'^\s*"(\w+):', read('pyproject.toml'), flags=re.M)
    assert set(FOLDER_MARKERS) | {'browser', 'soak'} == set(registered)
    tests = os.path.join(ROOT, 'tests')
    strays = [os.path.relpath(os.path.join(where, name), tests)
              for where, _, names in os.walk(tests) for name in names
              if name.startswith('test_') and name.endswith('.py')
              and os.path.relpath(where, tests).split(os.sep)[0] not in FOLDER_MARKERS]
    assert not strays, f'test modules outside the marker folders {FOLDER_MARKERS}: {strays}'


def test_architecture_page_lists_the_layers_of_the_import_check_in_order():
    """The Layers table of docs/architecture.rst names the subpackages in the order of
    LAYERS (tests/engine/test_import_graph.py), and those are the package's subpackages."""
    sys.path.insert(0, os.path.join(ROOT, 'tests', 'engine'))
    try:
        from test_import_graph import LAYERS
    finally:
        sys.path.pop(0)
    page = read('docs/architecture.rst')
    table = page[page.index('\nLayers\n'):page.index('\nLock order\n')]
    listed = re.findall(r'^``(\w+)/``', table, flags=re.M)
    engine = os.path.join(ROOT, 'odoo_pool_patch')
    packages = {name for name in os.listdir(engine)
                if os.path.isfile(os.path.join(engine, name, '__init__.py'))}
    assert listed == list(LAYERS[1:]) and set(listed) == packages, (listed, LAYERS, packages)


def test_package_map_names_every_module():
    """odoo_pool_patch/__init__.py's map names every module (docs/architecture.rst has
    the longer map, see test_architecture_page_names_every_engine_module)."""
    import odoo_pool_patch
    engine = os.path.join(ROOT, 'odoo_pool_patch')
    for where, _, names in os.walk(engine):
        for name in names:
            if name.endswith('.py') and name not in ('__init__.py', '__main__.py'):
                assert f'``{name[:-3]}``' in odoo_pool_patch.__doc__, \
                    f'odoo_pool_patch/__init__.py: add {name[:-3]} to the map'
