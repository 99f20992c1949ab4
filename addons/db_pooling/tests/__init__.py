from . import test_pool_active
