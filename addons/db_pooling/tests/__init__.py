from . import test_pool_active
from . import test_first_statement
