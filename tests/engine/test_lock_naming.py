"""The engine's lock convention (the docstring of odoo_pool_patch/pool/connection_pool.py),
checked on its source with ``ast``: a helper's name says which lock its caller holds.

- ``*_shared_locked`` (budget, parking, shared_state): the shared state's lock, so it is
  called inside ``with <state>.locked()`` or from another ``*_shared_locked`` function;
- ``*_exit_locked`` (parking): the object's ``_exit_lock``, so inside ``with
  <obj>._exit_lock`` or from another ``*_exit_locked`` method of the same object;
- any other ``*_locked``: the ``_lock`` of the object it is called on (the exchange's in
  shared/exchange.py), so inside ``with <obj>._lock`` on that very object or from
  another such method of ``self``. The pool lock is its books' ``lock``
  (pool/slots.py), and the pool and its collaborators (``books``, ``sessions``,
  ``sharing``, ``upkeep``, each with ``pool`` and ``books``) share it: in the pool/
  modules any receiver that names one of them (``self``, ``books``, ``self.pool.sharing``,
  ...) names the same lock's holder.

And the order: a method that takes the pool lock is never called with any lock held
(the pool lock comes first, and it is not re-entrant), and a function that takes the
shared lock never with the shared lock held (entered twice, the inner exit would
release the ``lockf`` of the outer).

Static: a call is matched by name, a lock by how the ``with`` spells it; a function
defined inside a locked block does not count as running under its lock.
"""
import ast
import pathlib
import re

import odoo_pool_patch

ENGINE = pathlib.Path(odoo_pool_patch.__file__).parent

# (module, function, helper): why that call may go without the lock. (Empty: the one
# exception there was, odoo_install.adopt booking connections of a pool no other thread
# saw yet, now calls pool.sessions.adopt, which takes the lock.)
ALLOWED = {}


def lock_of(expr):
    """What ``with expr:`` holds: ('shared', None), ('exit', object), ('own', object),
    or None for what is no lock of ours."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and \
            expr.func.attr == 'locked' and not expr.args:
        return 'shared', None
    if isinstance(expr, ast.Attribute) and expr.attr in ('_lock', 'lock', '_exit_lock'):
        return ('own' if expr.attr != '_exit_lock' else 'exit'), ast.unparse(expr.value)
    if isinstance(expr, ast.Name) and expr.id == '_lock':      # maintenance's module lock
        return 'own', None
    return None


def kind_of(name):
    """The lock a helper named ``name`` needs: 'shared', 'exit', 'own' or None."""
    for suffix, kind in (('_shared_locked', 'shared'), ('_exit_locked', 'exit'),
                         ('_locked', 'own')):
        if name.endswith(suffix):
            return kind
    return None


class Scan(ast.NodeVisitor):
    """Every call of a module, with the function it is in and the locks held there by
    the ``with`` blocks of that function; and which functions take which lock."""

    def __init__(self, pool_parts=False):
        self.pool_parts = pool_parts    # a pool/ module: its pool's parts share one lock
        self.function, self.held, self.aliases = '<module>', (), set()
        self.calls = []         # (line, function, called name, receiver, held)
        self.takes = {}         # function -> {'shared', 'own'} it takes in its own body
        self.self_calls = {}    # function -> names it calls on self

    def visit_FunctionDef(self, node):
        outer = self.function, self.held, self.aliases
        self.function, self.held, self.aliases = node.name, (), set()
        self.generic_visit(node)
        self.function, self.held, self.aliases = outer

    def visit_Assign(self, node):
        """``books = self.books``: a local name for a part of this pool (in pool/ modules)."""
        self.generic_visit(node)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if self.pool_parts and self.holder(ast.unparse(node.value)) == 'self':
                    self.aliases.add(target.id)
                else:
                    self.aliases.discard(target.id)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        outer = self.function, self.held
        self.function, self.held = '<lambda>', ()
        self.generic_visit(node)
        self.function, self.held = outer

    def visit_With(self, node):
        for item in node.items:
            self.visit(item)
        locks = tuple((lock[0], self.holder(lock[1])) for item in node.items
                      for lock in [lock_of(item.context_expr)] if lock is not None)
        for kind, holder in locks:
            if kind == 'shared' or holder == 'self':
                self.takes.setdefault(self.function, set()).add(kind)
        outer = self.held
        self.held = outer + locks
        for statement in node.body:
            self.visit(statement)
        self.held = outer

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Attribute):
            name, receiver = func.attr, self.holder(ast.unparse(func.value))
        elif isinstance(func, ast.Name):
            name, receiver = func.id, None
        else:
            name = receiver = None
        if name is not None:
            self.calls.append((node.lineno, self.function, name, receiver, self.held))
            if receiver == 'self':
                self.self_calls.setdefault(self.function, set()).add(name)
        self.generic_visit(node)


    def holder(self, receiver):
        """``self`` for a receiver that names this pool or one of its parts, in a pool/
        module: ``self``, ``self.books``, ``self.pool.sharing``... or a local name given one
        of them in this function; a ``pool`` or ``books`` that came from elsewhere (another
        pool's) stays itself."""
        if self.pool_parts and receiver is not None and (
                POOL_PART.fullmatch(receiver) or receiver in self.aliases):
            return 'self'
        return receiver


POOL_PART = re.compile(r'self(\.pool)?(\.(books|sessions|sharing|upkeep))?')


def scan(source, pool_parts=False):
    found = Scan(pool_parts)
    found.visit(ast.parse(source))
    return found


def naming_violations(module, found):
    """Calls of a ``*_locked`` helper without the lock its name says."""
    wrong = []
    for line, function, name, receiver, held in found.calls:
        kind = kind_of(name)
        if kind is None or (module, function, name) in ALLOWED:
            continue
        if kind == 'shared':
            ok = ('shared', None) in held or kind_of(function) == 'shared'
        else:
            ok = (kind, receiver) in held or (kind_of(function) == kind and receiver == 'self')
        if not ok:
            lock = {'shared': 'the shared lock (with <state>.locked())',
                    'exit': f'{receiver}._exit_lock', 'own': f'{receiver}._lock'}[kind]
            wrong.append(f'{module}:{line}: {function}() calls {name}() without {lock}')
    return wrong


def pool_lock_takers(found):
    """Methods of the pool (pool/connection_pool.py and its parts, scanned as one) that take
    the pool lock, themselves or through a method of the pool or a part."""
    takers = {function for function, kinds in found.takes.items() if 'own' in kinds}
    while True:
        more = {function for function, names in found.self_calls.items()
                if function not in takers and names & takers}
        if not more:
            return takers
        takers |= more


def order_violations(module, found, pool_takers, shared_takers):
    """Calls that take the pool lock with a lock held, or the shared lock under itself."""
    wrong = []
    for line, function, name, _receiver, held in found.calls:
        locked = held or kind_of(function)
        shared = any(kind == 'shared' for kind, _ in held) or kind_of(function) == 'shared'
        if name in pool_takers and locked:
            wrong.append(f'{module}:{line}: {function}() calls {name}(), which takes the pool '
                         f'lock, with a lock held')
        elif name in shared_takers and shared:
            wrong.append(f'{module}:{line}: {function}() calls {name}(), which takes the '
                         f'shared lock, under the shared lock')
    return wrong


def merged(scans):
    """One scan of several modules' methods (the pool and its parts)."""
    whole = Scan()
    for found in scans:
        for function, kinds in found.takes.items():
            whole.takes.setdefault(function, set()).update(kinds)
        for function, names in found.self_calls.items():
            whole.self_calls.setdefault(function, set()).update(names)
    return whole


# The engine proper (what Odoo runs); observability/, cli/ and devtools/ take no lock.
ENGINE_PACKAGES = ('', 'config', 'sessions', 'shared', 'pool', 'replicas', 'odoo_glue')


# The pool and its collaborators: one lock, and one scan for the order check.
POOL_CLASS = {f'pool/{name}.py' for name in ('connection_pool', 'slots', 'sessions', 'sharing',
                                             'upkeep')}


def engine():
    return {path.relative_to(ENGINE).as_posix():
            scan(path.read_text(), path.relative_to(ENGINE).as_posix() in POOL_CLASS)
            for package in ENGINE_PACKAGES for path in sorted((ENGINE / package).glob('*.py'))}


def test_locked_helpers_are_called_with_the_lock_their_name_says():
    scans = engine()
    checked = sum(1 for found in scans.values() for call in found.calls if kind_of(call[2]))
    assert checked > 80, f'only {checked} calls of *_locked helpers found: is this the engine?'
    wrong = [line for module, found in scans.items() for line in naming_violations(module, found)]
    assert not wrong, 'a *_locked helper called without its lock:\n' + '\n'.join(wrong)


def test_allowed_exceptions_still_exist():
    scans = engine()
    present = {(module, call[1], call[2]) for module, found in scans.items()
               for call in found.calls}
    assert set(ALLOWED) <= present, f'stale ALLOWED entries: {set(ALLOWED) - present}'


def test_locks_are_taken_in_order():
    scans = engine()
    # The pool is one object with its collaborators (pool/connection_pool.py and the pool/
    # modules of its parts).
    pool_takers = pool_lock_takers(merged(found for module, found in scans.items()
                                          if module in POOL_CLASS))
    shared_takers = {function for found in scans.values()
                     for function, kinds in found.takes.items()
                     if 'shared' in kinds and not function.startswith('__')}
    assert {'give_back', 'lend_idle', 'lent', 'retire', 'borrow', 'maintain', 'adopt'} <= \
        pool_takers
    assert {'release', 'try_acquire', 'park', '_receive', 'register'} <= shared_takers
    wrong = [line for module, found in scans.items()
             for line in order_violations(module, found, pool_takers, shared_takers)]
    assert not wrong, 'locks taken out of order:\n' + '\n'.join(wrong)


SAMPLE = '''
class Pool:
    def fine(self, other):
        with self._lock:
            self._push_idle_locked(1)
            self._hand_off_locked()
            self.give_back()                    # wrong: re-enters the pool lock
        with other._lock:
            self._push_idle_locked(2)           # wrong: other's lock, not self's
        self._push_idle_locked(3)               # wrong: no lock
        self.helper = lambda: self._push_idle_locked(4)     # wrong: runs later
    def _hand_off_locked(self):
        self._push_idle_locked(5)
        self.budget.grant_shared_locked(6)     # wrong: the pool lock is not the shared one
    def give_back(self):
        with self._lock:
            pass

class Budget:
    def fine(self):
        with self.state.locked() as cells:
            self.grant_shared_locked(cells)
            self.release()                      # wrong: re-enters the shared lock
    def grant_shared_locked(self, cells):
        self.count_shared_locked(cells)
    def release(self):
        with self.state.locked() as cells:
            self.count_shared_locked(cells)
        self.count_shared_locked(cells)        # wrong: after the lock
        with self._exit_lock:
            self._finish_exits_exit_locked()
        self._finish_exits_exit_locked()        # wrong: no lock
'''


POOL_SAMPLE = '''
class Sharing:
    def fine(self, pool):
        books = self.books
        with books.lock:
            self.pool.books.move_locked(1)
            self.books.hand_off_locked()
            self.pool.sharing.park_now_locked(2)
        with self.pool.books.lock:
            books.move_locked(3)
        with pool.books.lock:
            self.books.move_locked(4)           # wrong: another pool's lock
        other = pool.books
        with other.lock:
            books.move_locked(5)                # wrong: another pool's lock
        books = pool.books
        with self.books.lock:
            books.move_locked(6)                # wrong: books is another pool's now
        pool.books.move_locked(7)               # wrong: no lock
    def hand_over_locked(self):
        self.books.move_locked(8)
        self.pool.sessions.prefix_locked(9)
        pool = self.other
        pool.books.move_locked(10)              # wrong: another pool's, without its lock
'''


def test_the_checks_tell_this_pools_parts_from_another_pool():
    wrong = naming_violations('pool/sample.py', scan(POOL_SAMPLE, pool_parts=True))
    expected = [n for n, line in enumerate(POOL_SAMPLE.splitlines(), 1) if '# wrong' in line]
    assert sorted(int(line.split(':')[1]) for line in wrong) == expected, '\n'.join(wrong)


def test_the_checks_catch_calls_without_the_lock():
    found = scan(SAMPLE)
    wrong = naming_violations('sample.py', found) + order_violations(
        'sample.py', found, pool_lock_takers(found), {'release'})
    expected = [n for n, line in enumerate(SAMPLE.splitlines(), 1) if '# wrong' in line]
    assert sorted(int(line.split(':')[1]) for line in wrong) == expected, '\n'.join(wrong)
