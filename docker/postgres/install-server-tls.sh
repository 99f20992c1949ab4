#!/usr/bin/env bash
# Install a server certificate for PostgreSQL: copy server.crt, server.key and ca.crt from
# SOURCE into TARGET, owned by OWNER (default postgres), key mode 0600 as PostgreSQL
# requires (a key bind-mounted from the host has the host user's owner and mode).
# Usage: install-server-tls.sh SOURCE TARGET    (as root)
set -euo pipefail
source_dir=${1:?usage: install-server-tls.sh SOURCE TARGET}
target_dir=${2:?usage: install-server-tls.sh SOURCE TARGET}
owner=${OWNER:-postgres}
for name in server.crt server.key ca.crt; do
    if [ ! -r "$source_dir/$name" ]; then
        echo "install-server-tls: $source_dir/$name is missing: run docker/make-certs.sh first" >&2
        exit 1
    fi
done
mkdir -p "$target_dir"
install -o "$owner" -g "$(id -gn "$owner")" -m 0644 "$source_dir/server.crt" "$source_dir/ca.crt" "$target_dir/"
install -o "$owner" -g "$(id -gn "$owner")" -m 0600 "$source_dir/server.key" "$target_dir/"
chown "$owner" "$target_dir"
