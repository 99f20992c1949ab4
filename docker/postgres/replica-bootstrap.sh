#!/usr/bin/env bash
# Streaming replica: on first start (no PG_VERSION in PGDATA) copy the primary with
# pg_basebackup, using the primary's replication slot, and write the standby settings
# (standby.signal, primary_conninfo). Later starts do nothing.
#
# Run as the postgres user: by docker/postgres/entrypoint.sh in the replica container and
# by tests/test_deploy_kit.py against a local primary.
#
# Environment:
#   PGDATA                 data directory of the replica (empty or absent on first start)
#   PRIMARY_HOST           primary's host name (required), PRIMARY_PORT (default 5432)
#   REPLICATION_USER       default replicator; REPLICATION_PASSWORD (required)
#   REPLICATION_SLOT       slot made by primary-init.sh (default replica1)
#   BOOTSTRAP_TIMEOUT      seconds to wait for the primary (default 300)
set -euo pipefail
: "${PGDATA:?PGDATA must name the replica data directory}"
: "${PRIMARY_HOST:?PRIMARY_HOST must name the primary server}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set: set it in docker/postgres.env}"
PRIMARY_PORT=${PRIMARY_PORT:-5432}
REPLICATION_USER=${REPLICATION_USER:-replicator}
REPLICATION_SLOT=${REPLICATION_SLOT:-replica1}
BOOTSTRAP_TIMEOUT=${BOOTSTRAP_TIMEOUT:-300}

if [ -s "$PGDATA/PG_VERSION" ]; then
    echo "replica-bootstrap: $PGDATA already holds a cluster, starting it as it is"
    exit 0
fi

waited=0
until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
    if [ "$waited" -ge "$BOOTSTRAP_TIMEOUT" ]; then
        echo "replica-bootstrap: primary $PRIMARY_HOST:$PRIMARY_PORT not ready after" \
             "${BOOTSTRAP_TIMEOUT}s: is it running and reachable?" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

mkdir -p "$PGDATA"
chmod 700 "$PGDATA"
# pg_basebackup wants an empty directory: clear what an interrupted attempt left
find "$PGDATA" -mindepth 1 -delete
echo "replica-bootstrap: copying $PRIMARY_HOST:$PRIMARY_PORT into $PGDATA (slot $REPLICATION_SLOT)"
PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
    --host="$PRIMARY_HOST" --port="$PRIMARY_PORT" --username="$REPLICATION_USER" \
    --pgdata="$PGDATA" --wal-method=stream --slot="$REPLICATION_SLOT" \
    --write-recovery-conf --checkpoint=fast --no-password
echo "replica-bootstrap: done, $PGDATA is a standby of $PRIMARY_HOST:$PRIMARY_PORT"
