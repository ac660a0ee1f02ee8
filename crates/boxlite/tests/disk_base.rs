//! Base disks built from a rootfs folder: every attribute carried, built once under
//! concurrency, atomic. Needs e2fsprogs (mke2fs, debugfs, e2fsck) and busybox-static; the
//! device-node part needs root (as the whole project's CI does).

mod disk_support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use boxlite::home::Home;
use boxlite::rootfs::base;
use disk_support::*;

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes whatever is at `path` (the busybox tree has absolute symlinks to /bin/busybox:
/// writing through one would write into the host's busybox).
fn fresh(path: &Path) -> &Path {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).unwrap();
    }
    path
}

/// The tree of a small image with every kind of thing an image may carry.
fn awkward_tree(dir: &Path) {
    busybox_tree(dir);
    let d = dir;
    std::fs::write(fresh(&d.join("etc/secret")), "s3cret\n").unwrap();
    std::fs::set_permissions(d.join("etc/secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    chown(&d.join("etc/secret"), 1000, 50);
    std::fs::write(fresh(&d.join("bin/suid")), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(d.join("bin/suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::copy("/bin/busybox", fresh(&d.join("bin/ping"))).unwrap();
    // VFS_CAP_REVISION_2, cap_net_raw permitted + effective.
    let cap = [
        0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    set_xattr(&d.join("bin/ping"), "security.capability", &cap);
    set_xattr(&d.join("etc/secret"), "user.origin", b"layer-3");
    std::fs::write(fresh(&d.join("usr/bin/tool")), vec![7u8; 300_000]).unwrap();
    std::fs::hard_link(d.join("usr/bin/tool"), fresh(&d.join("usr/bin/tool-alias"))).unwrap();
    symlink("../../etc/secret", fresh(&d.join("usr/bin/to-secret"))).unwrap();
    let long_target = "x".repeat(200);
    symlink(&long_target, fresh(&d.join("long-link"))).unwrap();
    std::fs::create_dir(d.join("opt")).unwrap();
    chown(&d.join("opt"), 4242, 4343);
    std::fs::set_permissions(d.join("opt"), std::fs::Permissions::from_mode(0o2750)).unwrap();
    if is_root() {
        nix::sys::stat::mknod(
            fresh(&d.join("dev/null")),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    nix::unistd::mkfifo(
        fresh(&d.join("run/fifo")),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o751)).unwrap();
}

#[test]
fn base_disk_carries_the_tree_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs");
    awkward_tree(&tree);
    let home = Home::open(dir.path().join("home")).unwrap();

    // What a builder that crashed leaves behind is cleared by the next one.
    let stale = home.tmp_dir().join("rootfs-0123abcd-99999.raw");
    std::fs::write(&stale, b"half a filesystem").unwrap();
    let stale_script = home.tmp_dir().join("rootfs-0123abcd-99999.debugfs");
    std::fs::write(&stale_script, b"x").unwrap();

    let disk = base::ensure_base(&home, "sha256:0123abcd", &tree).unwrap();
    assert!(disk.built);
    assert_eq!(disk.path, home.rootfs_dir().join("0123abcd.raw"));
    let img = &disk.path;

    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    let root = debugfs(img, "stat /");
    assert!(root.contains("Mode:  0751"), "root folder mode: {root}");
    let listing = debugfs(img, "ls -l /");
    assert!(!listing.contains("lost+found"), "{listing}");

    let secret = debugfs(img, "stat /etc/secret");
    assert!(secret.contains("Mode:  0600"), "{secret}");
    assert!(secret.contains("User:  1000   Group:    50"), "{secret}");
    assert!(debugfs(img, "ea_list /etc/secret").contains("user.origin"));
    assert_eq!(debugfs(img, "cat /etc/secret"), "s3cret\n");
    assert!(debugfs(img, "stat /bin/suid").contains("Mode:  04755"));
    let caps = debugfs(img, "ea_list /bin/ping");
    assert!(
        caps.contains("security.capability (20) = 01 00 00 02 00 20 00 00"),
        "{caps}"
    );
    let opt = debugfs(img, "stat /opt");
    assert!(
        opt.contains("Mode:  02750") && opt.contains("User:  4242   Group:  4343"),
        "{opt}"
    );

    let inode = |p: &str| {
        let s = debugfs(img, &format!("stat {p}"));
        s.split_whitespace().nth(1).unwrap().to_string()
    };
    assert_eq!(
        inode("/usr/bin/tool"),
        inode("/usr/bin/tool-alias"),
        "hard link kept"
    );
    assert!(debugfs(img, "stat /usr/bin/tool").contains("Links: 2"));
    assert!(
        debugfs(img, "stat /usr/bin/to-secret").contains("Fast link dest: \"../../etc/secret\"")
    );
    assert!(debugfs(img, "stat /long-link").contains("Size: 200"));
    assert!(debugfs(img, "stat /run/fifo").contains("Type: FIFO"));
    if is_root() {
        let null = debugfs(img, "stat /dev/null");
        assert!(null.contains("Type: character special"), "{null}");
        assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    }
    let sh = debugfs(img, "stat /bin/sh");
    assert!(sh.contains("Type: symlink"), "{sh}");

    // Room to spare: free blocks and inodes beyond the tree.
    let sb = debugfs(img, "stats");
    let field = |name: &str| -> u64 {
        sb.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(field("Free blocks") * 4096 >= 16 << 20, "{sb}");
    assert!(field("Free inodes") >= 1000);

    // A second call finds it and does not rebuild.
    let again = base::ensure_base(&home, "0123abcd", &tree).unwrap();
    assert!(!again.built);
    assert_eq!(again.path, disk.path);
    assert!(dir_names(&home.tmp_dir()).is_empty(), "staging cleaned up");
}

#[test]
fn concurrent_creators_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let tree = Arc::new(dir.path().join("rootfs"));
    busybox_tree(&tree);
    let home = Arc::new(Home::open(dir.path().join("home")).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (home, tree) = (home.clone(), tree.clone());
            std::thread::spawn(move || base::ensure_base(&home, "img1", &tree).unwrap())
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.built).count(), 1);
    assert!(results.iter().all(|r| r.path == results[0].path));
    assert_eq!(dir_names(&home.rootfs_dir()), ["img1.lock", "img1.raw"]);
    assert!(dir_names(&home.tmp_dir()).is_empty());
}

#[test]
fn a_failed_build_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path().join("home")).unwrap();
    let missing = dir.path().join("no-such-rootfs");
    assert!(base::ensure_base(&home, "img2", &missing).is_err());
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(
        base::ensure_base(&home, "img2", &file),
        Err(base::BaseError::NotADirectory { .. })
    ));
    assert!(base::ensure_base(&home, "../evil", &file).is_err());
    assert!(!home.rootfs_dir().join("img2.raw").exists());
    assert!(dir_names(&home.tmp_dir()).is_empty());
}
