#!/usr/bin/env bash
# Builds the Debian package: target/debian/mes-gateway_<version>_<arch>.deb
#
#   deploy/build-deb.sh                                   # for this machine
#   deploy/build-deb.sh --target aarch64-unknown-linux-gnu   # cross (see README)
#
# Installs cargo-deb from crates.io when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb (once)"
  cargo install cargo-deb --locked
fi
cargo deb --locked "$@"
