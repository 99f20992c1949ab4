"""The stock Odoo options that interact with db_pooling's: documented in odoo.conf.example
and the reference (see conf_example), named in the error for one put in [db_pooling]
(see conf_file). Never parsed by us: Odoo reads them from [options]."""
from dataclasses import dataclass


@dataclass(frozen=True)
class StockOption:
    """A stock Odoo option that interacts with ours (documented, never parsed by us)."""
    name: str
    group: str
    default: str
    doc: str
    example: str = ''       # the value shown on the option's line
    active: bool = False    # written uncommented
    since: int = 16         # first Odoo series that has it


STOCK_OPTIONS = (
    StockOption('server_wide_modules', 'loading', 'base,web (Odoo 19: base,rpc,web)',
                'Modules loaded in every process before any database. Add db_pooling; Odoo '
                '19 serves /jsonrpc from the rpc module, keep it there: '
                'base,rpc,web,db_pooling. The addon is found on addons_path, or as '
                'odoo.addons.db_pooling after pip install into Odoo\'s environment.',
                'base,web,db_pooling', active=True),
    StockOption('db_host', 'pool', 'unset (Unix socket)',
                'Host of the primary server (with PgBouncer: PgBouncer\'s host).',
                '127.0.0.1', active=True),
    StockOption('db_port', 'pool', 'unset (5432)', 'Port of the primary server.', '5432', active=True),
    StockOption('db_user', 'pool', 'unset (the system user)',
                'Database role. Odoo refuses postgres: use a dedicated role.', 'odoo',
                active=True),
    StockOption('db_password', 'pool', 'unset', 'Password of db_user.'),
    StockOption('db_maxconn', 'pool', '64',
                'Most connections ONE process may hold (in use + idle + opening + closing), as '
                'in stock Odoo. Beyond it a borrower waits (db_pool_wait_timeout) instead of '
                'failing at once. Without the shared budget the instance may hold (processes '
                'x db_maxconn): lower it to fit the server.', '64'),
    StockOption('db_maxconn_gevent', 'pool', 'False (use db_maxconn)',
                'Odoo 17+: db_maxconn of the gevent (websocket/longpolling) process.', '16'),
    StockOption('workers', 'budget', '0 (threaded server)',
                'HTTP worker processes. Each takes one slot of the default budget; with 0, '
                'Odoo runs threads in one process and db_maxconn is the budget.', '8'),
    StockOption('max_cron_threads', 'budget', '2',
                'Cron worker processes (threads without workers). Each takes three slots of '
                'the default budget (its LISTEN connection and two per job); the cron reserve '
                'exists when it is above 0.', '1'),
    StockOption('db_replica_host', 'replicas', 'False (no replica)',
                'Odoo 18+: host of a read-only streaming replica; Odoo sends read-only routes '
                'and methods there. Leave it unset rather than empty.', 'replica.example.com'),
    StockOption('db_replica_port', 'replicas', 'False (db_port)', 'Odoo 18+: port of that replica.', '5432'),
    StockOption('db_name', 'pool', 'unset (every database of db_user)',
                'Databases this instance serves (comma-separated). With db_name set and no '
                'dbfilter Odoo takes the list from here, so db_pool_list_dbs_cache has nothing '
                'to cache; otherwise each process keeps the listing db_pool_list_dbs_cache '
                'seconds.'),
    StockOption('db_app_name', 'pool', 'odoo-{pid}',
                'Odoo 19: application_name of Odoo\'s connections (16-18: the ODOO_PGAPPNAME '
                'environment variable). Left at its default, db_pooling names connections '
                'odoo-<role>-<pid> (odoo-http-1234, odoo-cron-1235) so pg_stat_activity and '
                'the dashboard tell workers apart; any other value is kept as it is.',
                since=19),
    StockOption('db_sslmode', 'tls', 'prefer',
                'disable, allow, prefer, require, verify-ca, verify-full. Under prefer libpq '
                'silently falls back to plain text when the server offers no TLS (db_pooling '
                'logs it once per server). Use verify-full whenever the network is not yours.',
                'verify-full'),
)
