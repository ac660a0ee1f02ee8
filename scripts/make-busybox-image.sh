#!/usr/bin/env bash
# Makes a small real OCI image from Debian's busybox-static with umoci: an OCI layout at LAYOUT with
# the tag TAG (default latest). Usage: make-busybox-image.sh LAYOUT [TAG]
set -euo pipefail
layout=${1:?usage: make-busybox-image.sh LAYOUT [TAG]}
tag=${2:-latest}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -d "$layout" ] || umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
bash "$here/make-busybox-rootfs.sh" "$work/bundle/rootfs"
umoci repack --image "$layout:$tag" "$work/bundle"
umoci config --image "$layout:$tag" --config.cmd /bin/sh \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.workingdir / --author boxlite --os linux --architecture amd64
umoci gc --layout "$layout"
