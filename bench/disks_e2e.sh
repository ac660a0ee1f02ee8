#!/usr/bin/env bash
# Box disks through the real `boxlite` CLI, no guest booted: for the busybox and Debian test
# images, the time of `boxlite create` (median of 20, the base disk already built), bytes a Box
# disk takes right after create (median, `du`), and the time of `snapshot create`, `clone` and
# `snapshot restore` on a stopped Box. Prints a markdown table.
#
# Needs: a built CLI (cargo build --release -p boxlite-cli), qemu-utils, umoci, busybox-static,
# debootstrap for the Debian image (cached under /var/cache/boxlite-test by
# scripts/make-debian-image.sh). Usage: bench/disks_e2e.sh [N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-20}
bin=${BOXLITE_BIN:-$root/target/release/boxlite}
[ -x "$bin" ] || bin=$root/target/debug/boxlite
[ -x "$bin" ] || { echo "build the CLI first: cargo build --release -p boxlite-cli" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export BOXLITE_HOME=$scratch/home

bash "$root/scripts/make-busybox-image.sh" "$scratch/busybox" >/dev/null
bash "$root/scripts/make-debian-image.sh" "$scratch/debian" >/dev/null
"$bin" image import "$scratch/busybox" --tag localhost/busybox:bench >/dev/null
"$bin" image import "$scratch/debian" --tag localhost/debian:bench >/dev/null

now() { date +%s.%N; }
ms() { python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$1" "$2"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'; }
timed() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); ms "$t0" "$t1"; }

prev=0
echo "| image | base disk (MiB, du) | first create (ms) | create, median of $n (ms) | disk per Box after create (KiB, median) | snapshot create (ms) | clone (ms) | snapshot restore (ms) |"
echo "|---|---|---|---|---|---|---|---|"
for image in busybox debian; do
  ref=localhost/$image:bench
  first=$(timed "$bin" create --name "$image-first" "$ref" true)
  times=() sizes=()
  for i in $(seq 1 "$n"); do
    times+=("$(timed "$bin" create --name "$image-$i" "$ref" true)")
    disk=$("$bin" inspect "$image-$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["paths"]["disk"])')
    sizes+=("$(du -k "$disk" | cut -f1)")
  done
  all=$("$bin" system df --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["images"]["base_disks_bytes"])')
  base=$(python3 -c "import sys; print(round((int(sys.argv[1]) - int(sys.argv[2])) / 2**20, 1))" "$all" "$prev")
  prev=$all
  snap=$(timed "$bin" snapshot create "$image-1" s1)
  clone=$(timed "$bin" clone "$image-2" "$image-clone")
  restore=$(timed "$bin" snapshot restore "$image-1" s1)
  echo "| $image | $base | $first | $(printf '%s\n' "${times[@]}" | median) | $(printf '%s\n' "${sizes[@]}" | median) | $snap | $clone | $restore |"
done
