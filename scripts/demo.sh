#!/usr/bin/env bash
# The main job, from a fresh Debian/Ubuntu machine: installs what is missing, builds boxlite and
# its guest assets, makes a small real OCI image from Debian's busybox-static, imports it and runs
# a command in a Box (a real VM). Usage: scripts/demo.sh [COMMAND...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup-host.sh >&2
bash scripts/build-assets.sh >&2
cargo build --release -p boxlite-cli >&2
export PATH="$root/target/release:$PATH"
export BOXLITE_ASSETS="$root/target/assets"

layout=$(mktemp -d)/busybox
bash scripts/make-busybox-image.sh "$layout" >&2
boxlite image import "$layout" --tag localhost/busybox:demo >&2
if [ $# -eq 0 ]; then set -- sh -c 'echo "hello from $(uname -sr) in box $(hostname)"'; fi
exec boxlite run --rm localhost/busybox:demo "$@"
