#!/usr/bin/env bash
# Builds the boot assets of a Box into target/assets/:
#   vmlinux          Debian's uncompressed kernel (from scripts/fetch-kernel.sh)
#   kernel.version   its version string
#   initramfs.img    uncompressed cpio (newc; gzip would cost more to inflate under TCG than it
#                    saves in loading): /init = the static guest agent, the kernel modules the guest
#                    may need (with their dependencies, listed in /boxlite/modules.dep),
#                    and Debian's mke2fs with its shared libraries and loader under /boxlite/ so the
#                    agent can format a fresh volume before switching root.
#
# Idempotent and atomic: every output is written under a temporary name and renamed; when no input
# changed (agent binary, kernel, modules, mke2fs) nothing is rewritten.
# Usage: scripts/build-assets.sh            (BOXLITE_ASSETS_DIR overrides target/assets)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="${BOXLITE_ASSETS_DIR:-$root/target/assets}"
kernel_dir="${BOXLITE_KERNEL_DIR:-$root/assets/kernel}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"

# The modules the agent may load. Each gets one line in /boxlite/modules.dep:
#   NAME: FILE.ko ... NAME.ko      (its dependencies first, as modprobe resolves them)
# The agent loads the virtio transport, console and block drivers at boot and the rest only when
# a Box asks for them (a filesystem type, virtiofs, a NIC).
wanted=(virtio_pci virtio_console virtio_blk virtio_net af_packet fuse virtiofs overlay ext4 erofs)

bash "$root/scripts/fetch-kernel.sh" >/dev/null
version=$(cat "$kernel_dir/VERSION")
moddir="$kernel_dir/modules"

RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p boxlite-guest \
  --target x86_64-unknown-linux-gnu --manifest-path "$root/Cargo.toml" --target-dir "$target_dir"
agent="$target_dir/x86_64-unknown-linux-gnu/release/boxlite-guest"
if readelf -l "$agent" | grep -q 'program interpreter'; then
  echo "build-assets: $agent is not static" >&2
  exit 1
fi

modules=()     # every file to pack, once
dep_lines=()   # one line per wanted module
declare -A seen=()
for m in "${wanted[@]}"; do
  if ! deps=$(modprobe -d "$moddir" -S "$version" --show-depends "$m" 2>&1); then
    echo "build-assets: cannot resolve module $m: $deps" >&2
    exit 1
  fi
  files=()
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    files+=("$(basename "$path")")
    [ -n "${seen[$path]:-}" ] && continue
    seen[$path]=1
    modules+=("$path")
  done <<<"$deps"
  # Built-in modules (modprobe prints "builtin NAME") need no line.
  if [ ${#files[@]} -gt 0 ]; then dep_lines+=("$m: ${files[*]}"); fi
done

# mke2fs and everything its loader needs.
mke2fs=$(command -v mke2fs)
libs=()
while read -r lib; do libs+=("$lib"); done < <(ldd "$mke2fs" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}')

# Fingerprint of every input: skip the rebuild when nothing changed.
stamp=$( {
  echo "version $version"
  sha256sum "$agent" "$kernel_dir/vmlinux" "$mke2fs" "${libs[@]}" "${modules[@]}" /etc/mke2fs.conf \
    "$root/scripts/build-assets.sh"
} | sha256sum | cut -d' ' -f1)
if [ -s "$out/initramfs.img" ] && [ -s "$out/vmlinux" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  # The guest tests compare this date with the agent's sources.
  touch "$out/initramfs.img"
  echo "build-assets: up to date in $out"
  exit 0
fi

mkdir -p "$out"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tree="$stage/tree"
mkdir -p "$tree"/{dev,proc,sys,newroot,boxlite/modules,boxlite/lib}
mknod -m 600 "$tree/dev/console" c 5 1
strip -o "$tree/init" "$agent" && chmod 755 "$tree/init"
for m in "${modules[@]}"; do cp "$m" "$tree/boxlite/modules/"; done
printf '%s\n' "${dep_lines[@]}" >"$tree/boxlite/modules.dep"
cp "$mke2fs" "$tree/boxlite/mke2fs"
for lib in "${libs[@]}"; do cp -L "$lib" "$tree/boxlite/lib/"; done
cp /etc/mke2fs.conf "$tree/boxlite/mke2fs.conf"

(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible) >"$stage/initramfs.img"
cp "$kernel_dir/vmlinux" "$stage/vmlinux"
echo "$version" >"$stage/kernel.version"

mv -f "$stage/vmlinux" "$out/vmlinux"
mv -f "$stage/kernel.version" "$out/kernel.version"
mv -f "$stage/initramfs.img" "$out/initramfs.img"
echo "$stamp" >"$stage/stamp" && mv -f "$stage/stamp" "$out/.stamp"
echo "build-assets: $out/initramfs.img ($(stat -c %s "$out/initramfs.img") bytes, ${#modules[@]} modules, kernel $version)"
