#!/usr/bin/env bash
# Benchmark: boxlite's layer extraction + assembly against `umoci unpack` on the same image, a
# Debian bookworm minbase rootfs (debootstrap) packed with umoci into a two-layer OCI layout.
# Prints a table of median wall times and ratios. Needs root, debootstrap, umoci, network access
# to deb.debian.org for the first run (the rootfs is cached in $BENCH_DIR).
#   bench/unpack.sh [RUNS]          (default 3 runs; BENCH_DIR defaults to /var/tmp/boxlite-bench)
set -euo pipefail
runs=${1:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-/var/tmp/boxlite-bench}
mkdir -p "$dir"
cd "$dir"

if [ ! -d rootfs/usr ]; then
  echo "debootstrap --variant=minbase bookworm (a few minutes)..." >&2
  rm -rf rootfs.tmp
  debootstrap --variant=minbase bookworm rootfs.tmp http://deb.debian.org/debian >debootstrap.log 2>&1
  mv rootfs.tmp rootfs
fi

if [ ! -f layout/index.json ]; then
  echo "packing the rootfs with umoci..." >&2
  rm -rf layout b
  umoci init --layout layout
  umoci new --image layout:img
  umoci unpack --image layout:img b
  cp -a rootfs/. b/rootfs/
  umoci repack --image layout:img b
  rm -rf b
  # A second layer with the usual churn: deletions, a changed config, new files.
  umoci unpack --image layout:img b
  rm -rf b/rootfs/usr/share/doc b/rootfs/var/cache/apt/*.bin
  echo "bench" > b/rootfs/etc/hostname
  mkdir -p b/rootfs/opt/bench && cp -a b/rootfs/usr/bin/. b/rootfs/opt/bench/
  umoci repack --image layout:img b
  rm -rf b
fi

(cd "$repo" && cargo build --release --example unpack_layout >&2)
unpack="$repo/target/release/examples/unpack_layout"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

umoci_times=() cold_times=() link_times=() extract_times=()
for i in $(seq "$runs"); do
  rm -rf ref home out out-link; sync
  t0=$(now); umoci unpack --image layout:img ref >/dev/null; t1=$(now)
  umoci_times+=("$(echo "$t1 - $t0" | bc)")

  rm -rf home out out-link; sync
  t0=$(now); res=$("$unpack" layout img out --home home --mode copy); t1=$(now)
  cold_times+=("$(echo "$t1 - $t0" | bc)")
  extract_times+=("$(echo "$res" | awk '/^extract/ {print $2}')")

  t0=$(now); "$unpack" layout img out-link --home home --mode link >/dev/null; t1=$(now)
  link_times+=("$(echo "$t1 - $t0" | bc)")
done
rm -rf ref home out out-link

u=$(printf '%s\n' "${umoci_times[@]}" | median)
c=$(printf '%s\n' "${cold_times[@]}" | median)
e=$(printf '%s\n' "${extract_times[@]}" | median)
l=$(printf '%s\n' "${link_times[@]}" | median)
files=$(find rootfs | wc -l); size=$(du -sh rootfs | cut -f1)
printf '\nimage: debian bookworm minbase, %s paths, %s, 2 gzip layers; median of %s runs\n\n' "$files" "$size" "$runs"
printf '%-46s %9s %9s\n' "what" "seconds" "vs umoci"
printf '%-46s %9s %9s\n' "----" "-------" "--------"
printf '%-46s %9.2f %9s\n' "umoci unpack" "$u" "1.00"
printf '%-46s %9.2f %9.2f\n' "boxlite extract + assemble (copy), cold cache" "$c" "$(echo "$c / $u" | bc -l)"
printf '%-46s %9.2f %9.2f\n' "  of which extraction into the layer cache" "$e" "$(echo "$e / $u" | bc -l)"
printf '%-46s %9.2f %9.2f\n' "boxlite assemble (link), warm cache" "$l" "$(echo "$l / $u" | bc -l)"
