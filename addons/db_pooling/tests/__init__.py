from . import test_pool_active
from . import test_first_statement
from . import test_request_retry
