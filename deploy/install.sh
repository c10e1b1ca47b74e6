#!/bin/sh
# Installs mes-gateway on a system without dpkg (or stages it under DESTDIR).
#
#   cargo build --release && sudo deploy/install.sh
#   DESTDIR=/tmp/root deploy/install.sh target/release/mes-gateway   # staged, changes nothing else
#
# Existing configuration and secret files are never overwritten.
set -eu
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mes-gateway}
D=${DESTDIR:-}

[ -x "$BIN" ] || { echo "install.sh: $BIN not found: run 'cargo build --release' first" >&2; exit 1; }

install -D -m 0755 "$BIN" "$D/usr/bin/mes-gateway"
install -D -m 0644 systemd/mes-gateway.service "$D/usr/lib/systemd/system/mes-gateway.service"
install -D -m 0644 deploy/sysusers.d/mes-gateway.conf "$D/usr/lib/sysusers.d/mes-gateway.conf"
install -D -m 0644 deploy/tmpfiles.d/mes-gateway.conf "$D/usr/lib/tmpfiles.d/mes-gateway.conf"
install -D -m 0644 README.md "$D/usr/share/doc/mes-gateway/README.md"
for doc in docs/operating.md docs/security.md docs/d365-api.md docs/opcua.md config/RULES.md; do
    install -D -m 0644 "$doc" "$D/usr/share/doc/mes-gateway/$doc"
done
keep() { # keep SRC DEST MODE: install unless DEST exists
    if [ -e "$2" ]; then echo "keeping existing $2"; else install -D -m "$3" "$1" "$2"; fi
}
keep systemd/mes-gateway.default "$D/etc/default/mes-gateway" 0644
keep config/example/gateway.yaml "$D/etc/mes-gateway/gateway.yaml" 0640
keep config/example/rules.d/line1.yaml "$D/etc/mes-gateway/rules.d/line1.yaml" 0640
if [ ! -e "$D/etc/mes-gateway/d365-client-secret" ]; then
    install -m 0600 /dev/null "$D/etc/mes-gateway/d365-client-secret"
fi

if [ -z "$D" ]; then
    systemd-sysusers /usr/lib/sysusers.d/mes-gateway.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/mes-gateway.conf
    chgrp mes-gateway /etc/mes-gateway /etc/mes-gateway/gateway.yaml /etc/mes-gateway/rules.d /etc/mes-gateway/rules.d/line1.yaml
    systemctl daemon-reload
    cat <<'NEXT'
Installed. Next:
  1. put the D365 client secret in /etc/mes-gateway/d365-client-secret (mode 0600, root)
  2. edit /etc/mes-gateway/gateway.yaml and rules.d/
  3. mes-gateway check -c /etc/mes-gateway
  4. systemctl enable --now mes-gateway && journalctl -u mes-gateway -f
NEXT
fi
