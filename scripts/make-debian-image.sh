#!/usr/bin/env bash
# Makes a real Debian bookworm image: `debootstrap --variant=minbase` packed by umoci into an OCI
# layout at LAYOUT (tag bookworm). The finished layout is cached under
# ${BOXLITE_TEST_CACHE:-/var/cache/boxlite-test} since debootstrap takes minutes.
# Usage: make-debian-image.sh LAYOUT
set -euo pipefail
layout=${1:?usage: make-debian-image.sh LAYOUT}
cache=${BOXLITE_TEST_CACHE:-/var/cache/boxlite-test}/debian-bookworm-minbase
if [ ! -f "$cache/index.json" ]; then
  mkdir -p "$(dirname "$cache")"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/*
  umoci init --layout "$work/layout"
  umoci new --image "$work/layout:bookworm"
  umoci unpack --image "$work/layout:bookworm" "$work/bundle" >/dev/null
  rm -rf "$work/bundle/rootfs"
  mv "$work/rootfs" "$work/bundle/rootfs"
  umoci repack --image "$work/layout:bookworm" "$work/bundle"
  umoci config --image "$work/layout:bookworm" --config.cmd /bin/bash \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --os linux --architecture amd64
  umoci gc --layout "$work/layout"
  rm -rf "$cache.tmp"
  mv "$work/layout" "$cache.tmp"
  mv "$cache.tmp" "$cache"
fi
rm -rf "$layout"
cp -a "$cache" "$layout"
