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
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

umoci_times=() cold_times=() link_times=() extract_times=()
# Every run writes fresh directories and nothing is deleted until the end: ext4 skips recently
# freed inodes when it allocates, so deleting a tree right before a run slows that run's file
# creation several times over and turns the table into noise.
rm -rf run-*; sync
for i in $(seq "$runs"); do
  sync
  t0=$(now); umoci unpack --image layout:img "run-$i-ref" >/dev/null; t1=$(now)
  umoci_times+=("$(sub "$t1" "$t0")")

  sync
  t0=$(now); res=$("$unpack" layout img "run-$i-out" --home "run-$i-home" --mode copy); t1=$(now)
  cold_times+=("$(sub "$t1" "$t0")")
  extract_times+=("$(echo "$res" | awk '/^extract/ {print $2}')")

  t0=$(now); "$unpack" layout img "run-$i-link" --home "run-$i-home" --mode link >/dev/null; t1=$(now)
  link_times+=("$(sub "$t1" "$t0")")
done
# Same tree as umoci's? (paths, types, modes, owners, content, link targets, devices, xattrs,
# mtimes, hardlink groups)
python3 - run-1-ref/rootfs run-1-out run-1-link <<'PY'
import hashlib, os, stat, sys
def walk(root):
    out, inodes = {}, {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n); rel = os.path.relpath(p, root); st = os.lstat(p)
            x = sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False))
            h = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            if h: inodes.setdefault(st.st_ino, []).append(rel)
            out[rel] = [st.st_mode, st.st_uid, st.st_gid, h, os.readlink(p) if stat.S_ISLNK(st.st_mode) else None,
                        st.st_rdev, x, 0 if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns, st.st_ino]
    for k, v in out.items(): v[-1] = min(inodes.get(v[-1], [k])) if v[3] else None
    return out
ref = walk(sys.argv[1])
for tree in sys.argv[2:]:
    ours = walk(tree)
    bad = sorted(k for k in set(ref) | set(ours) if ref.get(k) != ours.get(k))
    print(f"check: {tree} vs umoci: {len(ours)} paths, {len(bad)} differences {bad[:5]}", file=sys.stderr)
    if bad: sys.exit(1)
PY
rm -rf run-*

u=$(printf '%s\n' "${umoci_times[@]}" | median)
c=$(printf '%s\n' "${cold_times[@]}" | median)
e=$(printf '%s\n' "${extract_times[@]}" | median)
l=$(printf '%s\n' "${link_times[@]}" | median)
files=$(find rootfs | wc -l); size=$(du -sh rootfs | cut -f1)
printf '\nimage: debian bookworm minbase, %s paths, %s, 2 gzip layers; median of %s runs\n\n' "$files" "$size" "$runs"
printf '%-46s %9s %9s\n' "what" "seconds" "vs umoci"
printf '%-46s %9s %9s\n' "----" "-------" "--------"
printf '%-46s %9.2f %9s\n' "umoci unpack" "$u" "1.00"
printf '%-46s %9.2f %9s\n' "boxlite extract + assemble (copy), cold cache" "$c" "$(div "$c" "$u")"
printf '%-46s %9.2f %9s\n' "  of which extraction into the layer cache" "$e" "$(div "$e" "$u")"
printf '%-46s %9.2f %9s\n' "boxlite assemble (link), warm cache" "$l" "$(div "$l" "$u")"
