"""Exceptions raised by db_pooling.

``PoolTimeout`` subclasses psycopg2's ``PoolError`` because that is what
stock Odoo raises and catches (the websocket cursor retry, for example).
"""
from psycopg2.pool import PoolError


class PoolTimeout(PoolError):
    """No connection became available within ``db_pool_wait_timeout``."""


class ConfigError(ValueError):
    """A db_pooling option in odoo.conf has a value we cannot use."""
