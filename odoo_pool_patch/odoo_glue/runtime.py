"""What db_pooling installed in this Odoo process: one :class:`Runtime`, ``RUNTIME``.

Empty until the addon's ``post_load`` ran (:func:`.odoo_install.install`); a forked worker
inherits its master's. The addon's routes (dashboard, status, metrics) and the replica
routes read it instead of module-level dictionaries.
"""


class Runtime:
    """This process's installation of db_pooling.

    - ``pid``: the process that installed it (None: not installed here);
    - ``settings``: the :class:`.options.Settings` read from odoo.conf;
    - ``series``: Odoo's series (``release.serie``, e.g. ``'18.0'``), ``major`` its number;
    - ``budget``: the instance's :class:`.budget.SharedBudget` (None: ``db_pool_shared``
      off);
    - ``router``: the :class:`.replicas.Router` (None: no replica routing).
    """
    __slots__ = ('pid', 'settings', 'series', 'major', 'budget', 'router')

    def __init__(self):
        self.pid = self.settings = self.series = self.budget = self.router = None
        self.major = 0

    @property
    def installed(self):
        return self.pid is not None


RUNTIME = Runtime()
