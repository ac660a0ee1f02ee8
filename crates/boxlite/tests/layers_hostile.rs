//! Hostile layers: path traversal, writes through symlinks (same layer, chained, lower layer,
//! absolute and relative targets), hardlinks out of the root, whiteouts and opaque markers
//! aimed through symlinks. Each must be refused with an error naming the member, or resolved
//! strictly inside the root, and the host sentinel must be untouched either way.

mod support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use boxlite::images::assemble::AssembleMode;
use support::{dir, file, hardlink, symlink, tar_bytes, Cache, Member};

/// A host directory with `secret` in it, that no layer may reach.
struct Sentinel {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Sentinel {
    fn new() -> Sentinel {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sentinel");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("secret"), "host secret\n").unwrap();
        Sentinel { _tmp: tmp, dir }
    }

    fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn assert_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"], "the host sentinel directory changed");
        assert_eq!(
            fs::read_to_string(self.dir.join("secret")).unwrap(),
            "host secret\n"
        );
        assert_eq!(fs::metadata(self.dir.join("secret")).unwrap().nlink(), 1);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(&format!(": {c}"));
        cur = c.source();
    }
    out
}

/// Extracts one layer, expecting a refusal naming `member`; nothing may be left in the cache.
fn refused(members: &[Member], member: &str) -> String {
    let cache = Cache::new();
    let err = cache
        .add_bytes(&tar_bytes(members))
        .expect_err("layer must be refused");
    let msg = error_chain(&err);
    assert!(msg.contains(member), "error must name {member:?}: {msg}");
    assert_eq!(
        fs::read_dir(cache.home.tmp_dir()).unwrap().count(),
        0,
        "staging left behind"
    );
    assert_eq!(
        fs::read_dir(cache.home.layers_dir()).unwrap().count(),
        0,
        "layer committed"
    );
    msg
}

/// Extracts and assembles the layers (each a member list), bottom first.
fn stack(
    cache: &Cache,
    layers: &[Vec<Member>],
    mode: AssembleMode,
) -> (PathBuf, Result<(), String>) {
    let mut ids = Vec::new();
    for l in layers {
        match cache.add_bytes(&tar_bytes(l)) {
            Ok(info) => ids.push(info.diff_id),
            Err(e) => return (PathBuf::new(), Err(error_chain(&e))),
        }
    }
    let (root, r) = cache.assemble(&ids, mode);
    (root, r.map(|_| ()).map_err(|e| error_chain(&e)))
}

#[test]
fn dotdot_member_names_are_refused() {
    let s = Sentinel::new();
    for name in ["../evil", "a/../../evil", "./../evil", "a/b/../../../evil"] {
        refused(&[dir("a", 0o755), file(name, b"x", 0o644)], name);
    }
    s.assert_untouched();
}

#[test]
fn absolute_member_names_stay_inside() {
    let s = Sentinel::new();
    let cache = Cache::new();
    let name = format!("{}/planted", s.path());
    let (root, r) = stack(
        &cache,
        &[vec![
            file(&name, b"inside\n", 0o644),
            file("/etc/passwd", b"root\n", 0o644),
        ]],
        AssembleMode::Copy,
    );
    r.unwrap();
    assert_eq!(
        fs::read_to_string(root.join(name.trim_start_matches('/'))).unwrap(),
        "inside\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/passwd")).unwrap(),
        "root\n"
    );
    s.assert_untouched();
}

#[test]
fn writes_through_symlinks_in_the_same_layer_are_refused() {
    let s = Sentinel::new();
    // Direct, chained, and relative-climbing symlinks, then a write below them.
    refused(
        &[symlink("esc", s.path()), file("esc/pwned", b"x", 0o644)],
        "esc/pwned",
    );
    refused(
        &[
            symlink("a", "b"),
            symlink("b", s.path()),
            file("a/pwned", b"x", 0o644),
        ],
        "a/pwned",
    );
    refused(
        &[
            symlink("up", "../../../../../../../../.."),
            file("up/tmp/pwned", b"x", 0o644),
        ],
        "up/tmp/pwned",
    );
    // Directory, hardlink, symlink and FIFO members below a symlink.
    refused(&[symlink("esc", s.path()), dir("esc/d", 0o755)], "esc/d");
    refused(
        &[
            file("f", b"x", 0o644),
            symlink("esc", s.path()),
            hardlink("esc/h", "f"),
        ],
        "esc/h",
    );
    refused(&[symlink("esc", s.path()), symlink("esc/l", "/x")], "esc/l");
    s.assert_untouched();
}

#[test]
fn hardlinks_out_of_the_root_are_refused() {
    let s = Sentinel::new();
    let secret = format!("{}/secret", s.path());
    for target in [
        "..",
        "../",
        "/..",
        "a/../..",
        &format!("../../../../../../../..{secret}"),
    ] {
        refused(&[dir("a", 0o755), hardlink("stolen", target)], "stolen");
    }
    // Through a symlink in the same layer.
    refused(
        &[symlink("s", s.path()), hardlink("stolen", "s/secret")],
        "stolen",
    );
    // Through a lower layer's symlink: resolved inside the root, where nothing is.
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        let cache = Cache::new();
        let (_, r) = stack(
            &cache,
            &[
                vec![symlink("s", s.path())],
                vec![hardlink("stolen", "s/secret")],
            ],
            mode,
        );
        let err = r.unwrap_err();
        assert!(err.contains("stolen"), "{err}");
    }
    // An absolute host path is a path inside the root.
    let cache = Cache::new();
    let (_, r) = stack(
        &cache,
        &[vec![hardlink("stolen", &secret)]],
        AssembleMode::Link,
    );
    assert!(r.unwrap_err().contains("stolen"));
    s.assert_untouched();
}

#[test]
fn lower_layer_symlinks_are_never_followed_out_of_the_root() {
    let s = Sentinel::new();
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        // Undeclared parent through an absolute symlink: looked up inside the root, where the
        // sentinel path does not exist: refused, naming the path.
        let cache = Cache::new();
        let (_, r) = stack(
            &cache,
            &[
                vec![symlink("esc", s.path())],
                vec![file("esc/pwned", b"x", 0o644)],
            ],
            mode,
        );
        let err = r.unwrap_err();
        assert!(err.contains("esc"), "{err}");

        // Relative climb: clamped at the root.
        let cache = Cache::new();
        let (_, r) = stack(
            &cache,
            &[
                vec![symlink("up", "../../../../../../../../../../")],
                vec![file("up/pwned", b"x", 0o644)],
            ],
            mode,
        );
        // `up` resolves to the root itself: the file lands at the root, inside.
        r.unwrap();

        // A declared directory replaces the lower symlink.
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[
                vec![symlink("esc", s.path())],
                vec![dir("esc", 0o755), file("esc/pwned", b"x", 0o644)],
            ],
            mode,
        );
        r.unwrap();
        assert!(fs::symlink_metadata(root.join("esc")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(root.join("esc/pwned")).unwrap(), "x");

        // Whiteouts and opaque markers below a lower symlink stay inside too.
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[
                vec![symlink("esc", s.path())],
                vec![file("esc/.wh.secret", b"", 0o644)],
            ],
            mode,
        );
        r.unwrap();
        assert_eq!(
            fs::read_link(root.join("esc")).unwrap().to_str().unwrap(),
            s.path()
        );
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[
                vec![symlink("esc", s.path())],
                vec![file("esc/.wh..wh..opq", b"", 0o644)],
            ],
            mode,
        );
        r.unwrap();
        assert!(
            fs::symlink_metadata(root.join("esc")).unwrap().is_dir(),
            "an opaque directory is a directory"
        );
    }
    s.assert_untouched();
}

#[test]
fn undeclared_directories_merge_through_in_root_symlinks() {
    // Merged /usr: lib -> usr/lib in the base, a later layer adds lib/libfoo.so.
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[
                vec![
                    dir("usr", 0o755),
                    dir("usr/lib", 0o755),
                    file("usr/lib/libc.so", b"c", 0o644),
                    symlink("lib", "usr/lib"),
                ],
                vec![
                    file("lib/libfoo.so", b"foo", 0o644),
                    file("lib64/.wh.nothing", b"", 0o644),
                ],
            ],
            mode,
        );
        r.unwrap();
        assert!(fs::symlink_metadata(root.join("lib"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(root.join("usr/lib/libfoo.so")).unwrap(),
            "foo"
        );
        assert_eq!(
            fs::read_to_string(root.join("usr/lib/libc.so")).unwrap(),
            "c"
        );
        // A directory holding only a whiteout is not created where nothing was.
        assert!(!root.join("lib64").exists());
    }
}

#[test]
fn whiteout_names_that_escape_are_refused() {
    refused(&[file("a/.wh..", b"", 0o644)], "a/.wh..");
    refused(&[file(".wh...", b"", 0o644)], ".wh...");
    refused(&[file(".wh.x/y", b"", 0o644)], ".wh.x/y");
}

#[test]
fn later_members_replace_earlier_ones_by_unlinking() {
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[vec![
                file("f", b"first version, much longer\n", 0o644),
                hardlink("g", "f"),
                file("f", b"second\n", 0o600),
                dir("d", 0o755),
                file("d/inner", b"i", 0o644),
                file("d", b"now a file\n", 0o644),
                file("e", b"a file first\n", 0o644),
                dir("e", 0o750),
            ]],
            mode,
        );
        r.unwrap();
        assert_eq!(fs::read_to_string(root.join("f")).unwrap(), "second\n");
        assert_eq!(fs::metadata(root.join("f")).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(
            fs::read_to_string(root.join("g")).unwrap(),
            "first version, much longer\n"
        );
        assert_eq!(fs::read_to_string(root.join("d")).unwrap(), "now a file\n");
        assert!(fs::metadata(root.join("e")).unwrap().is_dir());
        assert_eq!(fs::metadata(root.join("e")).unwrap().mode() & 0o7777, 0o750);
    }
}

#[test]
fn privileged_metadata_devices_setuid_and_directory_modes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the privileged path: run as root"
    );
    let mut suid = file("usr/bin/su", b"#!/bin/sh\n", 0o4755);
    suid.uid = 0;
    let mut sgid = file("usr/bin/wall", b"#!/bin/sh\n", 0o2755);
    sgid.gid = 5;
    let mut owned = file("home/u/file", b"mine\n", 0o640);
    (owned.uid, owned.gid) = (1000, 1000);
    let null = Member {
        name: "dev/null".into(),
        kind: b'3',
        mode: 0o666,
        dev: (1, 3),
        ..Member::default()
    };
    let sda = Member {
        name: "dev/sda".into(),
        kind: b'4',
        mode: 0o660,
        gid: 6,
        dev: (8, 0),
        ..Member::default()
    };
    let fifo = Member {
        name: "run/fifo".into(),
        kind: b'6',
        mode: 0o620,
        ..Member::default()
    };
    let mut mtime_dir = dir("ro", 0o555);
    mtime_dir
        .pax
        .push(("mtime".into(), b"1600000000.25".to_vec()));
    let layer = vec![
        suid,
        sgid,
        owned,
        null,
        sda,
        fifo,
        dir("tmp", 0o1777),
        mtime_dir,
        file("ro/inside", b"written after the directory member\n", 0o444),
    ];
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        let cache = Cache::new();
        let (root, r) = stack(&cache, std::slice::from_ref(&layer), mode);
        r.unwrap();
        let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(md("usr/bin/su").mode() & 0o7777, 0o4755);
        assert_eq!(md("usr/bin/wall").mode() & 0o7777, 0o2755);
        assert_eq!(md("usr/bin/wall").gid(), 5);
        assert_eq!(
            (md("home/u/file").uid(), md("home/u/file").gid()),
            (1000, 1000)
        );
        assert!(md("dev/null").file_type().is_char_device());
        assert_eq!(md("dev/null").rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(md("dev/null").mode() & 0o7777, 0o666);
        assert!(md("dev/sda").file_type().is_block_device());
        assert_eq!(md("dev/sda").rdev(), nix::sys::stat::makedev(8, 0));
        assert!(md("run/fifo").file_type().is_fifo());
        assert_eq!(md("run/fifo").mode() & 0o7777, 0o620);
        assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
        assert_eq!(md("ro").mode() & 0o7777, 0o555);
        assert_eq!(
            (md("ro").mtime(), md("ro").mtime_nsec()),
            (1_600_000_000, 250_000_000)
        );
        assert_eq!(md("ro/inside").mtime(), 1_700_000_000);
    }
}

#[test]
fn truncated_and_corrupt_tars_are_refused() {
    let full = tar_bytes(&[file("big", &vec![b'x'; 5000], 0o644)]);
    for cut in [100, 512, 512 + 2000] {
        let cache = Cache::new();
        let path = cache.tmp.path().join("t.tar");
        fs::write(&path, &full[..cut]).unwrap();
        let err = cache.add_tar(&path).expect_err("truncated tar must fail");
        let msg = error_chain(&err);
        assert!(msg.contains("truncated"), "{msg}");
        assert_eq!(fs::read_dir(cache.home.tmp_dir()).unwrap().count(), 0);
    }
}

fn gnu_tar(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = std::process::Command::new("tar")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn sparse_files_gnu_and_pax() {
    let src = tempfile::tempdir().unwrap();
    let f = fs::File::create(src.path().join("sparse.img")).unwrap();
    f.set_len(20 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", 7 << 20).unwrap();
    f.write_all_at(b"end", (20 << 20) - 3).unwrap();
    drop(f);
    let want = fs::read(src.path().join("sparse.img")).unwrap();
    for format in [
        "--format=gnu",
        "--sparse-version=0.0",
        "--sparse-version=0.1",
        "--sparse-version=1.0",
    ] {
        let mut args = vec!["--sparse", format, "-cf", "-", "sparse.img"];
        if format.starts_with("--sparse-version") {
            args.insert(0, "--format=posix");
        }
        let bytes = gnu_tar(&args, src.path());
        assert!(bytes.len() < 1 << 20, "{format}: tar itself is sparse");
        let cache = Cache::new();
        let info = cache.add_bytes(&bytes).unwrap();
        for mode in [AssembleMode::Link, AssembleMode::Copy] {
            let (root, r) = cache.assemble(std::slice::from_ref(&info.diff_id), mode);
            r.unwrap();
            let got = fs::read(root.join("sparse.img")).unwrap();
            assert!(got == want, "{format} {mode:?}: sparse content differs");
            let blocks = fs::metadata(root.join("sparse.img")).unwrap().blocks();
            assert!(
                blocks * 512 < 1 << 20,
                "{format} {mode:?}: holes stay holes ({blocks} blocks)"
            );
        }
    }
}

#[test]
fn concurrent_ensure_extracts_once() {
    let cache = Cache::new();
    let bytes = tar_bytes(&[dir("d", 0o755), file("d/f", b"x", 0o644)]);
    let path = cache.tmp.path().join("l.tar");
    fs::write(&path, &bytes).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| cache.add_tar(&path).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|i| i.extracted).count(), 1);
    assert_eq!(cache.storage.extractions(), 1);
    assert_eq!(
        fs::read_dir(cache.home.tmp_dir()).unwrap().count(),
        0,
        "losers cleaned up"
    );
    assert!(!cache.add_tar(&path).unwrap().extracted);
    assert_eq!(
        fs::metadata(cache.storage.layer_dir(&results[0].diff_id))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

#[test]
fn a_later_member_replaces_a_hardlink_into_a_lower_layer() {
    for mode in [AssembleMode::Link, AssembleMode::Copy] {
        let cache = Cache::new();
        let (root, r) = stack(
            &cache,
            &[
                vec![file("base", b"lower\n", 0o644)],
                vec![
                    hardlink("x", "base"),
                    file("x", b"the later member\n", 0o644),
                ],
            ],
            mode,
        );
        r.unwrap();
        assert_eq!(
            fs::read_to_string(root.join("x")).unwrap(),
            "the later member\n"
        );
        assert_eq!(fs::read_to_string(root.join("base")).unwrap(), "lower\n");
        assert_ne!(
            fs::metadata(root.join("x")).unwrap().ino(),
            fs::metadata(root.join("base")).unwrap().ino()
        );
    }
}

#[test]
fn overlayfs_xattrs_are_recorded_not_applied() {
    let mut f = file("etc/x", b"x", 0o644);
    f.pax
        .push(("SCHILY.xattr.trusted.overlay.opaque".into(), b"y".to_vec()));
    f.pax
        .push(("SCHILY.xattr.user.fine".into(), b"ok".to_vec()));
    let cache = Cache::new();
    let info = cache.add_bytes(&tar_bytes(&[f])).unwrap();
    let meta = cache.storage.read_meta(&info.diff_id).unwrap();
    let skipped: Vec<(String, String)> = meta
        .skipped_xattrs
        .iter()
        .flat_map(|(p, xs)| xs.iter().map(move |x| (p.to_string(), x.name.clone())))
        .collect();
    assert_eq!(
        skipped,
        [("etc/x".to_string(), "trusted.overlay.opaque".to_string())]
    );
    let (root, r) = cache.assemble(&[info.diff_id], AssembleMode::Copy);
    r.unwrap();
    assert_eq!(
        xattr::get(root.join("etc/x"), "trusted.overlay.opaque").unwrap(),
        None
    );
    assert_eq!(
        xattr::get(root.join("etc/x"), "user.fine")
            .unwrap()
            .as_deref(),
        Some(&b"ok"[..])
    );
}

#[test]
fn many_placeholder_directories_links_and_replacements() {
    // Undeclared directories, each file then replaced, and hardlinks into a lower layer, in
    // numbers: every record must be right. (The cost of record keeping is covered by the
    // `forget_below` unit test; wall time here is the filesystem's.)
    let n = 500;
    let mut members = Vec::with_capacity(3 * n);
    for i in 0..n {
        members.push(file(&format!("d{i}/f"), b"1", 0o644));
    }
    for i in 0..n {
        members.push(hardlink(&format!("d{i}/g"), "lower"));
        members.push(file(&format!("d{i}/f"), b"2", 0o644));
    }
    let cache = Cache::new();
    let base = cache
        .add_bytes(&tar_bytes(&[file("lower", b"lower\n", 0o644)]))
        .unwrap();
    let info = cache.add_bytes(&tar_bytes(&members)).unwrap();
    let meta = cache.storage.read_meta(&info.diff_id).unwrap();
    assert_eq!(meta.external_hardlinks.len(), n);
    assert_eq!(meta.implicit_dirs.len(), n + 1);
    assert!(meta.marker_dirs.is_empty());
    let (root, r) = cache.assemble(&[base.diff_id, info.diff_id], AssembleMode::Link);
    r.unwrap();
    for i in [0, n / 2, n - 1] {
        assert_eq!(
            fs::read_to_string(root.join(format!("d{i}/f"))).unwrap(),
            "2"
        );
        assert_eq!(
            fs::metadata(root.join(format!("d{i}/g"))).unwrap().ino(),
            fs::metadata(root.join("lower")).unwrap().ino()
        );
    }
}

#[test]
fn sparse_members_count_their_holes_against_the_limit() {
    use boxlite::images::digest::Digest;
    use boxlite::images::storage::{LayerBlob, Limits};
    let src = tempfile::tempdir().unwrap();
    let f = fs::File::create(src.path().join("huge-hole.img")).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let bytes = gnu_tar(
        &["--sparse", "--format=posix", "-cf", "-", "huge-hole.img"],
        src.path(),
    );
    assert!(bytes.len() < 1 << 20);
    let cache = Cache::new();
    let path = cache.tmp.path().join("sparse.tar");
    fs::write(&path, &bytes).unwrap();
    let digest = Digest::of(&bytes);
    let limits = Limits {
        max_uncompressed_bytes: 64 << 20,
        ..Limits::default()
    };
    let err = cache
        .storage
        .ensure_layer(
            &LayerBlob {
                path: &path,
                media_type: support::TAR,
                digest: &digest,
            },
            &digest,
            &limits,
        )
        .unwrap_err();
    let msg = error_chain(&err);
    assert!(
        msg.contains("huge-hole.img") && msg.contains(&(64u64 << 20).to_string()),
        "{msg}"
    );
    assert_eq!(fs::read_dir(cache.home.tmp_dir()).unwrap().count(), 0);
    assert_eq!(fs::read_dir(cache.home.layers_dir()).unwrap().count(), 0);
}
