"""The ``odoo-pool`` command (``main``): ``top`` and ``check`` here, ``demo`` from devtools.
Nothing of the engine imports it."""
from .main import main

__all__ = ['main']
