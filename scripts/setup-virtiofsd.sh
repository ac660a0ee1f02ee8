#!/usr/bin/env bash
# Installs virtiofsd (the Rust vhost-user virtio-fs daemon, crate `virtiofsd` on crates.io) that boxlite
# spawns for every host-directory share. Debian 12 ships none and QEMU 10 ships none.
#
# Idempotent and fast when the wanted version is already there. Needs cargo and the C libraries
# libseccomp-dev and libcap-ng-dev (scripts/setup-host.sh installs them).
# Usage: setup-virtiofsd.sh [INSTALL_ROOT]   (default $BOXLITE_VIRTIOFSD_ROOT or /usr/local; the binary
# lands in INSTALL_ROOT/bin/virtiofsd, which boxlite finds on PATH or through BOXLITE_VIRTIOFSD).
set -euo pipefail
version=1.14.0
root=${1:-${BOXLITE_VIRTIOFSD_ROOT:-/usr/local}}
bin="$root/bin/virtiofsd"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  echo "setup-virtiofsd: virtiofsd $version already in $bin"
  exit 0
fi
for lib in libseccomp libcap-ng; do
  pkg-config --exists "$lib" 2>/dev/null || {
    echo "setup-virtiofsd: $lib development files missing (run scripts/setup-host.sh)" >&2
    exit 1
  }
done
cargo install virtiofsd --version "=$version" --locked --root "$root"
"$bin" --version
