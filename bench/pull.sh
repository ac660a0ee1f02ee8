#!/usr/bin/env bash
# Pull benchmark: `boxlite pull` (download, verify, extract, record) against `skopeo copy
# docker://… oci:DIR` (download and verify only) of a Debian bookworm minbase image, made with
# debootstrap + umoci and pushed to a local docker-registry. Prints a table with medians and
# the ratio boxlite/skopeo.
#
# Usage: bench/pull.sh            (RUNS=5 BOXLITE=path/to/boxlite DEBIAN_MIRROR=url to override)
# Needs: debootstrap, umoci, skopeo, docker-registry, root (debootstrap). The debootstrap tree is
# cached under target/bench/ so later runs skip it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=$root/target/bench
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

# 1. The image: debootstrap minbase, packed by umoci (cached).
mkdir -p "$cache"
if [ ! -f "$cache/bookworm-minbase/index.json" ]; then
  echo "bench: debootstrap --variant=minbase bookworm (once)" >&2
  rm -rf "$cache/bookworm-minbase" "$cache/bundle"
  if [ ! -f "$cache/rootfs/etc/debian_version" ]; then
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase bookworm "$cache/rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1
  fi
  # debootstrap keeps the packages it installed; an image would not.
  rm -f "$cache/rootfs/var/cache/apt/archives/"*.deb
  umoci init --layout "$cache/bookworm-minbase"
  umoci new --image "$cache/bookworm-minbase:latest"
  umoci unpack --image "$cache/bookworm-minbase:latest" "$cache/bundle" >/dev/null
  (cd "$cache/rootfs" && tar -cf - --numeric-owner --xattrs .) | (cd "$cache/bundle/rootfs" && tar -xf - --numeric-owner --xattrs)
  umoci repack --image "$cache/bookworm-minbase:latest" "$cache/bundle"
  umoci config --image "$cache/bookworm-minbase:latest" --config.cmd /bin/bash
  rm -rf "$cache/rootfs" "$cache/bundle"
fi

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
skopeo copy --quiet --dest-tls-verify=false "oci:$cache/bookworm-minbase:latest" "docker://$ref"
size=$(du -sb "$work/registry" | cut -f1)

# 3. Timings, each run from an empty destination.
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
: >"$work/boxlite.times"
: >"$work/skopeo.times"
for i in $(seq "$runs"); do
  home=$work/home-$i
  t0=$(now)
  BOXLITE_HOME=$home "$boxlite" pull --quiet "$ref" >/dev/null
  t1=$(now)
  skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$work/oci-$i:x"
  t2=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}' >>"$work/boxlite.times"
  awk -v a="$t1" -v b="$t2" 'BEGIN {print b - a}' >>"$work/skopeo.times"
  rm -rf "$home" "$work/oci-$i"
done
b=$(median <"$work/boxlite.times")
s=$(median <"$work/skopeo.times")

printf '\nbookworm minbase: %s MB in the registry, %s runs, median seconds\n\n' \
  "$(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1e6}')" "$runs"
printf '%-48s %10s\n' "command" "seconds"
printf '%-48s %10.3f\n' "boxlite pull (download, verify, extract)" "$b"
printf '%-48s %10.3f\n' "skopeo copy docker:// oci: (download, verify)" "$s"
printf '%-48s %10.2f\n' "ratio boxlite / skopeo" "$(awk -v b="$b" -v s="$s" 'BEGIN {print b / s}')"
