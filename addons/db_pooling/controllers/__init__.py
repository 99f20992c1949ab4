from . import status
from . import metrics
