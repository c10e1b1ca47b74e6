#!/usr/bin/env bash
# Builds the .deb and checks it: dpkg -c lists the binary, the unit and the example
# config; the files, unpacked into a throwaway root the way dpkg would place them
# (dpkg -x: no maintainer scripts run on this host), are where the unit expects them.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/build-deb.sh
deb=$(ls -t target/debian/mes-gateway_*.deb | head -n 1)
echo "checking $deb"
passed=0; failed=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }

listing=$(dpkg -c "$deb")
for f in ./usr/bin/mes-gateway ./etc/mes-gateway/gateway.yaml ./etc/mes-gateway/rules.d/line1.yaml \
         ./usr/lib/sysusers.d/mes-gateway.conf ./usr/lib/tmpfiles.d/mes-gateway.conf ./etc/default/mes-gateway; do
  if grep -q " $f\$" <<<"$listing"; then ok; else bad "dpkg -c does not list $f"; fi
done
unit_path=$(grep -oE ' \./(usr/)?lib/systemd/system/mes-gateway\.service$' <<<"$listing" | tr -d ' ' || true)
if [ -n "$unit_path" ]; then ok; else bad "dpkg -c does not list the systemd unit"; fi

conffiles=$(dpkg-deb -f "$deb" Package >/dev/null && dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles 2>/dev/null || true)
for f in /etc/mes-gateway/gateway.yaml /etc/default/mes-gateway; do
  if grep -qx "$f" <<<"$conffiles"; then ok; else bad "$f is not a conffile"; fi
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg -x "$deb" "$root"
unit="$root/${unit_path#./}"
for exe in $(grep -E '^Exec(Start|StartPre)=' "$unit" | cut -d= -f2 | awk '{print $1}'); do
  if [ -x "$root$exe" ]; then ok; else bad "unit runs $exe, not in the package"; fi
done
cred=$(grep -E '^LoadCredential=' "$unit" | cut -d: -f2)
if [ -d "$root$(dirname "$cred")" ]; then ok; else bad "credential directory $(dirname "$cred") missing"; fi
if "$root/usr/bin/mes-gateway" --version >/dev/null; then ok; else bad "packaged binary does not run"; fi
if dpkg-deb -I "$deb" postinst | grep -q 'install -m 0600'; then ok; else bad "postinst does not create the 0600 secret file"; fi

echo "deb: $passed passed, $failed failed"
[ "$failed" = 0 ]
