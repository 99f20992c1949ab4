#!/usr/bin/env bash
# Certificates for TLS between Odoo and PostgreSQL in the compose stack (docker-compose.tls.yml):
# a private CA (ca.crt, ca.key) and one server certificate (server.crt, server.key) valid for
# every name Odoo connects to, so that db_sslmode = verify-full works.
#
# Usage: docker/make-certs.sh [OUTDIR]        (default: docker/certs next to this script)
# Environment: SERVER_NAMES  host names in the server certificate (default: db db-replica
#              localhost; 127.0.0.1 is always added), DAYS validity (default 825).
# An existing CA is kept (delete OUTDIR to start over); the server certificate is remade.
set -euo pipefail
outdir=${1:-$(dirname "$0")/certs}
names=${SERVER_NAMES:-db db-replica localhost}
days=${DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }
mkdir -p "$outdir"
cd "$outdir"
umask 077
if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
    openssl req -new -x509 -nodes -days "$days" -subj "/CN=db_pooling stack CA" \
        -keyout ca.key -out ca.crt 2>/dev/null
fi
read -r -a name_list <<< "$names"
san=$(printf 'DNS:%s,' "${name_list[@]}")IP:127.0.0.1
openssl req -new -nodes -subj "/CN=${name_list[0]}" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext
chmod 644 ca.crt server.crt
chmod 600 ca.key server.key
echo "make-certs: $outdir/server.crt for $san, signed by $outdir/ca.crt"
