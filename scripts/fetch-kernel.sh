#!/usr/bin/env bash
# Fetches Debian's guest kernel (the package linux-image-amd64 depends on) with `apt-get download`,
# unpacks it into assets/kernel/ (never into /boot) and extracts the uncompressed vmlinux from the
# bzImage, since TCG boots the uncompressed kernel through PVH twice as fast (no xz under TCG).
#
# Output: assets/kernel/{vmlinux,VERSION,modules/lib/modules/<version>/...}. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="${BOXLITE_KERNEL_DIR:-$root/assets/kernel}"

if [ -s "$out/vmlinux" ] && [ -s "$out/VERSION" ]; then
  echo "fetch-kernel: $(cat "$out/VERSION") already in $out"
  exit 0
fi

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -q >/dev/null
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve linux-image-amd64" >&2; exit 1; }
version=${pkg#linux-image-}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"; (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1)
deb=$(ls "$work"/*.deb)
mkdir -p "$work/root"
dpkg-deb -x "$deb" "$work/root"

python3 - "$work/root/boot/vmlinuz-$version" "$work/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
magic = b"\xfd7zXZ\x00"
start = data.find(magic)
while start != -1:
    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = d.decompress(data[start:])
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
    except lzma.LZMAError:
        pass
    start = data.find(magic, start + 1)
sys.exit("no xz-compressed ELF payload found in the bzImage")
PY

stage="$out.tmp.$$"
rm -rf "$stage"
mkdir -p "$stage/modules/lib"
mv "$work/root/lib/modules" "$stage/modules/lib/modules"
depmod -b "$stage/modules" "$version"
mv "$work/vmlinux" "$stage/vmlinux"
cp "$work/root/boot/vmlinuz-$version" "$stage/vmlinuz"
echo "$version" > "$stage/VERSION"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$stage" "$out"
echo "fetch-kernel: $version in $out"
