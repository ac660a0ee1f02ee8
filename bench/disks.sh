#!/usr/bin/env bash
# Disk benchmark: base disk build per image and per MB against `mke2fs -d` alone (the floor) and
# mkfs.erofs on the same tree, Box disk creation (median of 20), bytes per Box after create,
# snapshot and clone times. Prints a markdown table.
#
# Trees: small = the busybox rootfs (scripts/make-busybox-rootfs.sh), medium = /usr/lib/python3,
# large = /usr/share (tens of thousands of files). Override with BENCH_TREES=name=path,...
# Needs: qemu-utils, e2fsprogs, erofs-utils, busybox-static (scripts/setup-host.sh). Run as root
# so every file of the trees is readable.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=${BENCH_SCRATCH:-$(mktemp -d)}
trap 'rm -rf "$scratch/busybox"' EXIT

if [ -z "${BENCH_TREES:-}" ]; then
  bash "$root/scripts/make-busybox-rootfs.sh" "$scratch/busybox" >/dev/null
  BENCH_TREES="small=$scratch/busybox,medium=/usr/lib/python3,large=/usr/share"
fi
export BENCH_TREES BENCH_SCRATCH="$scratch"
cd "$root"
cargo test --release -q -p boxlite --test disk_bench -- --ignored --nocapture 2>&1 \
  | grep -E '^\|' || { echo "bench failed" >&2; exit 1; }
