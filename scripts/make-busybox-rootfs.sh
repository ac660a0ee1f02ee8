#!/usr/bin/env bash
# Makes a minimal root filesystem tree from Debian's busybox-static: /bin/busybox with one relative
# symlink per applet, /etc/passwd and /etc/group (root, a user "tester" 1000:1000, nobody), and the usual empty
# directories. Usage: make-busybox-rootfs.sh DIR  (DIR must not exist or be empty).
set -euo pipefail
dir=${1:?usage: make-busybox-rootfs.sh DIR}
bb=/bin/busybox
[ -x "$bb" ] || { echo "make-busybox-rootfs: $bb missing (apt-get install busybox-static)" >&2; exit 1; }
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,home/tester,var/tmp,run}
chmod 1777 "$dir/tmp" "$dir/var/tmp"
chmod 700 "$dir/root"
[ -s "$bb" ] || { echo "make-busybox-rootfs: $bb is empty (reinstall busybox-static)" >&2; exit 1; }
rm -f "$dir/bin/busybox"
cp "$bb" "$dir/bin/busybox"
for applet in $("$bb" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$dir/$(dirname "$applet")"
  # Relative links: a host-side write through one (by a test fixture, say) stays in the tree
  # instead of landing on the host's /bin/busybox.
  up=$(dirname "$applet" | sed -e 's|[^/][^/]*|..|g')
  [ -e "$dir/$applet" ] || [ -L "$dir/$applet" ] || ln -s "$up/bin/busybox" "$dir/$applet"
done
cat > "$dir/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
tester:x:1000:1000:Tester:/home/tester:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$dir/etc/group" <<'G'
root:x:0:
tester:x:1000:
staff:x:50:tester
nogroup:x:65534:
G
chown 1000:1000 "$dir/home/tester"
echo "busybox rootfs" > "$dir/etc/issue"
