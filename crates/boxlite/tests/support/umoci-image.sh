#!/usr/bin/env bash
# Builds a three-layer OCI image with umoci, for comparing boxlite's layer extraction and
# assembly with `umoci unpack`. Usage: umoci-image.sh WORKDIR REPO_ROOT
# Layer 1: a busybox rootfs (scripts/make-busybox-rootfs.sh).
# Layer 2: deletions (file, symlink, directory), setuid/setgid/sticky, owners, a hardlink pair,
#          symlinks, a FIFO, device nodes, user.* and security.capability xattrs, long names,
#          odd mtimes, an empty file, a sparse-ish large file.
# Layer 3: a directory deleted and re-created (whiteout + new content), one name of a hardlink
#          pair removed, a file replaced by a directory, a directory replaced by a symlink.
# Layer 4 (hand-made, uncompressed, `umoci raw add-layer`): an opaque directory marker, a
#          hardlink to a file of a lower layer, a file below a lower symlink to a directory
#          (merged-/usr style), a PAX xattr on a new file.
# Leaves WORKDIR/layout (tag "img") and WORKDIR/ref (umoci unpack of the result).
set -euo pipefail
work=${1:?usage: umoci-image.sh WORKDIR REPO_ROOT}
repo=${2:?usage: umoci-image.sh WORKDIR REPO_ROOT}
L="$work/layout"
umoci init --layout "$L"
umoci new --image "$L:img"

# Layer 1
umoci unpack --image "$L:img" "$work/b1"
bash "$repo/scripts/make-busybox-rootfs.sh" "$work/b1/rootfs"
umoci repack --image "$L:img" "$work/b1"
rm -rf "$work/b1"

# Layer 2
umoci unpack --image "$L:img" "$work/b2"
R="$work/b2/rootfs"
rm -f "$R/bin/ls" "$R/etc/issue"
rm -rf "$R/var/tmp"
cp "$R/bin/busybox" "$R/usr/bin/suidbox" && chmod 4755 "$R/usr/bin/suidbox"
cp "$R/bin/busybox" "$R/usr/bin/sgidbox" && chgrp 50 "$R/usr/bin/sgidbox" && chmod 2711 "$R/usr/bin/sgidbox"
mkdir -p "$R/srv/shared" && chmod 1777 "$R/srv/shared"
mkdir -p "$R/opt/app/sub" && echo "app config" > "$R/opt/app/config" && echo deep > "$R/opt/app/sub/deep"
echo "tester's file" > "$R/home/tester/notes" && chown -R 1000:1000 "$R/home/tester" && chmod 600 "$R/home/tester/notes"
echo "data shared by two names" > "$R/opt/app/linked-a" && ln "$R/opt/app/linked-a" "$R/opt/app/linked-b"
echo "a pair across directories" > "$R/usr/bin/pair-1" && ln "$R/usr/bin/pair-1" "$R/opt/app/pair-2"
ln -s ../opt/app/config "$R/etc/app.conf"
ln -s /nonexistent/absolute "$R/etc/dangling"
mkfifo -m 620 "$R/run/control.fifo"
mkdir -p "$R/usr/lib" && echo "libc" > "$R/usr/lib/libc.so.6" && ln -s usr/lib "$R/lib"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 660 "$R/dev/sda1" b 8 1
: > "$R/etc/empty"
mkdir -p "$R/replace-me" && echo x > "$R/replace-me/x"
echo "a file for now" > "$R/becomes-dir"
python3 - "$R" <<'PY'
import os, struct, sys
r = sys.argv[1]
os.setxattr(os.path.join(r, "opt/app/config"), "user.origin", b"umoci test")
os.setxattr(os.path.join(r, "opt/app"), "user.dirattr", b"on a directory")
cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
os.setxattr(os.path.join(r, "usr/bin/suidbox"), "security.capability", cap)
long_dir = os.path.join(r, "long", *(["segment-%02d-with-a-long-name" % i for i in range(8)]))
os.makedirs(long_dir)
with open(os.path.join(long_dir, "f" * 200), "w") as f:
    f.write("long path\n")
os.symlink("t" * 180, os.path.join(r, "long", "long-target-link"))
with open(os.path.join(r, "opt/app/big.bin"), "wb") as f:
    f.write(os.urandom(1 << 20))
    f.seek(8 << 20)
    f.write(b"tail")
os.utime(os.path.join(r, "opt/app/config"), ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
PY
umoci repack --image "$L:img" "$work/b2"
rm -rf "$work/b2"

# Layer 3
umoci unpack --image "$L:img" "$work/b3"
R="$work/b3/rootfs"
rm -rf "$R/opt/app/sub" && mkdir "$R/opt/app/sub" && echo "new deep" > "$R/opt/app/sub/new"
rm -f "$R/opt/app/linked-a"
rm -f "$R/becomes-dir" && mkdir "$R/becomes-dir" && echo inner > "$R/becomes-dir/inner"
rm -rf "$R/replace-me" && ln -s opt/app "$R/replace-me"
echo "appended" >> "$R/etc/passwd"
umoci repack --image "$L:img" "$work/b3"
rm -rf "$work/b3"

# Layer 4
python3 - "$work/layer4.tar" <<'PY'
import io, sys, tarfile
def add(tf, name, typ, data=b"", mode=0o644, link="", pax=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.linkname = typ, mode, 1700000000, link
    if pax:
        ti.pax_headers = pax
    ti.size = len(data) if typ == tarfile.REGTYPE else 0
    tf.addfile(ti, io.BytesIO(data) if typ == tarfile.REGTYPE else None)
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "opt/app", tarfile.DIRTYPE, mode=0o750)
    add(tf, "opt/app/fresh", tarfile.REGTYPE, b"only this survives the opaque marker\n",
        pax={"SCHILY.xattr.user.layer": "four"})
    add(tf, "opt/app/.wh..wh..opq", tarfile.REGTYPE)
    add(tf, "opt/cross-link", tarfile.LNKTYPE, link="usr/bin/pair-1")
    add(tf, "lib/libnew.so", tarfile.REGTYPE, b"added through the lib symlink\n", mode=0o755)
PY
umoci raw add-layer --image "$L:img" "$work/layer4.tar"

umoci unpack --image "$L:img" "$work/ref"
