"""The pool's shape (docs/architecture.rst): ``ConnectionPool`` is the Odoo-facing API and
drives four parts, one object and one module each (``pool.books``, ``pool.sessions``,
``pool.sharing``, ``pool.upkeep``), instead of one class built from mixins; no class of
the pool is a hub of 400 lines or more. Checked on the source with ``ast`` and on a pool
object (no server needed: a pool connects at its first borrow)."""
import ast
import pathlib

import odoo_pool_patch
from odoo_pool_patch.pool.connection_pool import ConnectionPool
from odoo_pool_patch.pool.sessions import SessionSteps
from odoo_pool_patch.pool.sharing import Sharing
from odoo_pool_patch.pool.slots import Books
from odoo_pool_patch.pool.upkeep import Upkeep

POOL = pathlib.Path(odoo_pool_patch.__file__).parent / 'pool'
MOST_LINES = 399
PARTS = {'books': Books, 'sessions': SessionSteps, 'sharing': Sharing, 'upkeep': Upkeep}


def class_lengths():
    """{(module, class): lines} of every class of the pool/ package."""
    found = {}
    for path in sorted(POOL.glob('*.py')):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                found[(path.name, node.name)] = node.end_lineno - node.lineno + 1
    return found


def test_no_class_of_the_pool_reaches_400_lines():
    lengths = class_lengths()
    assert ('connection_pool.py', 'ConnectionPool') in lengths and len(lengths) >= 8, lengths
    long = {name: lines for name, lines in lengths.items() if lines > MOST_LINES}
    assert not long, f'classes of pool/ over {MOST_LINES} lines: {long}'


def test_the_pool_is_no_mixin_class_and_owns_one_object_per_part():
    assert ConnectionPool.__bases__ == (object,)
    for part in PARTS.values():
        assert part.__bases__ == (object,), part
    pool = ConnectionPool(3)
    try:
        for name, part in PARTS.items():
            assert type(getattr(pool, name)) is part, name
            assert getattr(pool, name).pool is pool
        # One set of books and one lock for the pool and all its parts.
        assert all(getattr(pool, name).books is pool.books for name in PARTS if name != 'books')
        waiter_lock = pool.books.lock
        assert pool.sessions.books.lock is waiter_lock and pool.sharing.books.lock is waiter_lock
    finally:
        pool.shutdown()
