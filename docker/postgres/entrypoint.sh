#!/usr/bin/env bash
# Entrypoint of the primary and replica containers (official postgres image), run as root:
# optional TLS (PG_TLS_DIR holds server.crt/server.key/ca.crt from docker/make-certs.sh),
# replica bootstrap on first start (PG_ROLE=replica), then the image's own entrypoint.
set -euo pipefail
here=$(dirname "$0")
if [ -n "${PG_TLS_DIR:-}" ]; then
    "$here/install-server-tls.sh" "$PG_TLS_DIR" /var/lib/postgresql/tls
    set -- "$@" -c ssl=on -c ssl_cert_file=/var/lib/postgresql/tls/server.crt \
        -c ssl_key_file=/var/lib/postgresql/tls/server.key \
        -c ssl_ca_file=/var/lib/postgresql/tls/ca.crt
fi
if [ "${PG_ROLE:-primary}" = replica ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    gosu postgres "$here/replica-bootstrap.sh"
fi
exec docker-entrypoint.sh "$@"
