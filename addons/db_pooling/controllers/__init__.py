from . import status
from . import metrics
from . import dashboard
