#!/usr/bin/env bash
# Pull benchmark: `boxlite pull` (download, verify, extract, record) against `skopeo copy
# docker://… oci:DIR` (download and verify only) of a Debian bookworm minbase image, made with
# debootstrap + umoci and pushed to a local docker-registry. Prints a table with medians and
# the ratio boxlite/skopeo, and against skopeo + umoci unpack, which ends where boxlite pull
# ends: an extracted root filesystem on disk.
#
# Usage: bench/pull.sh            (RUNS=5 BOXLITE=path/to/boxlite to override)
#        BASELINE=path/to/other/boxlite bench/pull.sh
#                                  adds a row for another build, run in alternating order with
#                                  this one (the disk's state after the previous run weighs on
#                                  whichever runs first).
# Needs: debootstrap, umoci, skopeo, docker-registry, root (debootstrap). The image is made and
# cached by scripts/make-debian-image.sh, shared with the tests.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
boxlite=${BOXLITE:-$root/target/release/boxlite}
work=$(mktemp -d)
registry_pid=
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -x "$boxlite" ]; then
  echo "bench: building boxlite (release)" >&2
  (cd "$root" && cargo build --release -q -p boxlite-cli)
fi

# 1. The image: debootstrap minbase packed by umoci (scripts/make-debian-image.sh caches it).
bash "$root/scripts/make-debian-image.sh" "$work/layout" >/dev/null

# 2. A local registry holding it.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
  secret: bench
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
ref=127.0.0.1:$port/bench/bookworm:minbase
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:bookworm" "docker://$ref"
size=$(du -sb "$work/registry" | cut -f1)

# 3. Timings, each run into fresh destinations. Nothing is deleted until the end: ext4 skips
# recently freed inodes when it allocates (recently_deleted), so removing one run's thousands of
# files right before the next run makes every file creation of that run several times slower.
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {print b - a}'; }
: >"$work/boxlite.times"
: >"$work/skopeo.times"
: >"$work/umoci.times"
baseline=${BASELINE:-}
: >"$work/baseline.times"
pull_baseline() {
  [ -n "$baseline" ] || return 0
  sync
  local a b
  a=$(now)
  BOXLITE_HOME=$work/base-home-$i "$baseline" pull --quiet "$ref" >/dev/null
  b=$(now)
  elapsed "$a" "$b" >>"$work/baseline.times"
}
for i in $(seq "$runs"); do
  [ $((i % 2)) -eq 0 ] && pull_baseline
  sync
  t0=$(now)
  BOXLITE_HOME=$work/home-$i "$boxlite" pull --quiet "$ref" >/dev/null
  t1=$(now)
  [ $((i % 2)) -eq 1 ] && pull_baseline
  sync
  t2=$(now)
  skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$work/oci-$i:x"
  t3=$(now)
  # The same end state as boxlite pull: an extracted root filesystem, on disk.
  umoci unpack --image "$work/oci-$i:x" "$work/bundle-$i" >/dev/null
  sync
  t4=$(now)
  elapsed "$t0" "$t1" >>"$work/boxlite.times"
  elapsed "$t2" "$t3" >>"$work/skopeo.times"
  elapsed "$t2" "$t4" >>"$work/umoci.times"
done
b=$(median <"$work/boxlite.times")
s=$(median <"$work/skopeo.times")
u=$(median <"$work/umoci.times")

printf '\nbookworm minbase: %s MB in the registry, %s runs, median seconds\n\n' \
  "$(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1e6}')" "$runs"
printf '%-56s %9s %8s\n' "command" "seconds" "boxlite/"
printf '%-56s %9.3f %8s\n' "boxlite pull (download, verify, extract, sync)" "$b" ""
printf '%-56s %9.3f %8.2f\n' "skopeo copy docker:// oci: (download, verify)" "$s" \
  "$(awk -v b="$b" -v s="$s" 'BEGIN {print b / s}')"
printf '%-56s %9.3f %8.2f\n' "skopeo copy + umoci unpack + sync (same end state)" "$u" \
  "$(awk -v b="$b" -v s="$u" 'BEGIN {print b / s}')"
if [ -n "$baseline" ]; then
  p=$(median <"$work/baseline.times")
  printf '%-56s %9.3f %8.2f\n' "baseline: $(basename "$baseline") pull" "$p" \
    "$(awk -v b="$b" -v s="$p" 'BEGIN {print b / s}')"
fi
