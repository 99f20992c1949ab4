#!/usr/bin/env bash
# Primary PostgreSQL: a replication role, a pg_hba rule and the settings streaming replicas need.
#
# The official postgres image runs it once, on a fresh data directory, from
# /docker-entrypoint-initdb.d/ (as the postgres user, with a socket-only server running);
# tests/test_deploy_kit.py runs the same file against a local cluster. Idempotent.
#
# Environment (docker/postgres.env in the compose stack):
#   PGDATA                 data directory (pg_hba.conf is there)
#   POSTGRES_USER          superuser psql connects as (libpq's PGHOST/PGPORT apply)
#   REPLICATION_USER       role the replicas connect as (default replicator)
#   REPLICATION_PASSWORD   its password (required)
#   REPLICATION_SLOTS      physical replication slots to create, separated by spaces (default replica1)
#   REPLICATION_NETWORK    pg_hba address the replicas connect from (default samenet)
set -euo pipefail
: "${PGDATA:?PGDATA must name the primary data directory}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set: set it in docker/postgres.env}"
REPLICATION_USER=${REPLICATION_USER:-replicator}
REPLICATION_SLOTS=${REPLICATION_SLOTS:-replica1}
REPLICATION_NETWORK=${REPLICATION_NETWORK:-samenet}

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" \
     --dbname postgres -v user="$REPLICATION_USER" -v password="$REPLICATION_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'password';
ALTER SYSTEM SET wal_level = 'replica';
ALTER SYSTEM SET max_wal_senders = 10;
ALTER SYSTEM SET max_replication_slots = 10;
-- a slot keeps the WAL a stopped replica still needs, up to this much (then the replica
-- must be rebuilt) so that a dead replica cannot fill the primary's disk
ALTER SYSTEM SET max_slot_wal_keep_size = '2GB';
ALTER SYSTEM SET hot_standby = on;
-- replicas copy these settings: their long reads then hold back vacuum on the primary
-- instead of being cancelled
ALTER SYSTEM SET hot_standby_feedback = on;
SQL

for slot in $REPLICATION_SLOTS; do
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" \
         --dbname postgres -v slot="$slot" <<'SQL'
SELECT pg_create_physical_replication_slot(:'slot')
 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'slot');
SQL
done

rule="host replication $REPLICATION_USER $REPLICATION_NETWORK scram-sha-256"
if ! grep -qxF "$rule" "$PGDATA/pg_hba.conf"; then
    printf '%s\n' "$rule" >> "$PGDATA/pg_hba.conf"
fi
echo "primary-init: role $REPLICATION_USER, slots $REPLICATION_SLOTS, pg_hba: $rule"
