"""python -m odoo_pool_patch.cli: the ``odoo-pool`` command."""
import sys

from .main import main

sys.exit(main())
