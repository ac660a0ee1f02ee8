//! Extraction and assembly without privileges: the test re-runs itself as `nobody` (through
//! `setpriv`), where owners, device nodes and `security.*` xattrs cannot be applied. Extraction
//! must still succeed, record what it could not apply in the layer metadata (and warn), apply
//! everything else, and the cache must stay removable.

mod support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use boxlite::images::assemble::AssembleMode;
use support::{dir, file, tar_bytes, Cache, Member};

const INNER: &str = "BOXLITE_TEST_UNPRIVILEGED_INNER";
const NOBODY: u32 = 65534;

#[test]
fn unprivileged_extraction_records_what_it_cannot_apply() {
    if std::env::var_os(INNER).is_some() {
        return inner();
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the outer half drops from root to nobody"
    );
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("test-binary");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    for p in [tmp.path(), scratch.as_path(), exe.as_path()] {
        nix::unistd::chown(p, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(&exe)
        .args([
            "--exact",
            "unprivileged_extraction_records_what_it_cannot_apply",
            "--nocapture",
        ])
        .env(INNER, "1")
        .env("TMPDIR", &scratch)
        .output()
        .expect("setpriv (util-linux) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "unprivileged half failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the unprivileged half did not run:\n{text}"
    );
    let left: Vec<_> = fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["kept-home"],
        "the unprivileged run left other files behind"
    );

    // Root assembling the unprivileged cache creates the device nodes it recorded.
    let home = boxlite::home::Home::open(scratch.join("kept-home")).unwrap();
    let storage = boxlite::images::storage::ImageStorage::new(&home);
    let ids = storage.list_layers().unwrap();
    assert_eq!(ids.len(), 1);
    let dest = tmp.path().join("rootfs");
    boxlite::images::assemble::assemble(&storage, &ids, &dest, AssembleMode::Copy).unwrap();
    let null = fs::symlink_metadata(dest.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    assert_eq!(null.mtime(), 1_700_000_000);
}

fn inner() {
    assert!(!nix::unistd::geteuid().is_root());
    let cap = hex::decode("0100000201200000000000000000000000000000").unwrap();
    let mut ping = file("usr/bin/ping", b"ping\n", 0o755);
    ping.pax
        .push(("SCHILY.xattr.security.capability".into(), cap.clone()));
    ping.pax
        .push(("SCHILY.xattr.user.kept".into(), b"yes".to_vec()));
    let mut owned = file("home/u/notes", b"notes\n", 0o640);
    (owned.uid, owned.gid) = (1000, 1000);
    let null = Member {
        name: "dev/null".into(),
        kind: b'3',
        mode: 0o666,
        dev: (1, 3),
        ..Member::default()
    };
    let fifo = Member {
        name: "run/fifo".into(),
        kind: b'6',
        mode: 0o600,
        ..Member::default()
    };
    let layer = tar_bytes(&[
        dir("usr", 0o755),
        dir("usr/bin", 0o755),
        ping,
        owned,
        file("usr/bin/suid", b"s\n", 0o4755),
        null,
        fifo,
        dir("ro", 0o555),
        file("ro/x", b"x", 0o444),
    ]);

    let cache = Cache::new();
    let info = cache
        .add_bytes(&layer)
        .expect("unprivileged extraction succeeds");
    let meta = cache.storage.read_meta(&info.diff_id).unwrap();
    let null = meta
        .skipped_devices
        .iter()
        .find(|(p, _)| p.to_string() == "dev/null")
        .expect("device recorded");
    assert_eq!(
        (null.1.kind, null.1.major, null.1.minor, null.1.mode),
        ('c', 1, 3, 0o666)
    );
    let skipped = meta
        .skipped_xattrs
        .iter()
        .find(|(path, _)| path.to_string() == "usr/bin/ping")
        .and_then(|(_, xs)| xs.iter().find(|x| x.name == "security.capability"))
        .expect("security.capability recorded");
    assert_eq!(skipped.value_hex, hex::encode(&cap));
    assert!(
        meta.chown_failures >= 1,
        "owner 1000:1000 could not be applied and is counted"
    );

    for mode in [AssembleMode::Copy, AssembleMode::Link] {
        let (root, r) = cache.assemble(std::slice::from_ref(&info.diff_id), mode);
        r.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(
            xattr::get(root.join("usr/bin/ping"), "user.kept")
                .unwrap()
                .as_deref(),
            Some(&b"yes"[..])
        );
        assert_eq!(md("usr/bin/suid").mode() & 0o7777, 0o4755);
        assert!(md("run/fifo").file_type().is_fifo());
        assert!(
            !root.join("dev/null").exists(),
            "no device node without privilege"
        );
        assert_eq!(md("ro").mode() & 0o7777, 0o555);
        assert_eq!(fs::read_to_string(root.join("ro/x")).unwrap(), "x");
        boxlite_remove(&root);
    }
    cache
        .storage
        .remove_layer(&info.diff_id)
        .expect("the cache stays removable");
    assert!(!cache.storage.has_layer(&info.diff_id));
    let tmp_root = cache.tmp.path().to_path_buf();
    drop(cache);
    assert!(!tmp_root.exists());

    // A cache for the privileged half to assemble.
    let kept = std::env::temp_dir().join("kept-home");
    let home = boxlite::home::Home::open(&kept).unwrap();
    let storage = boxlite::images::storage::ImageStorage::new(&home);
    let digest = boxlite::images::digest::Digest::of(&layer);
    let path = kept.join("layer.tar");
    fs::write(&path, &layer).unwrap();
    let blob = boxlite::images::storage::LayerBlob {
        path: &path,
        media_type: support::TAR,
        digest: &digest,
    };
    storage
        .ensure_layer(&blob, &digest, &Default::default())
        .unwrap();
}

/// Removes an assembled tree with read-only directories in it (as its unprivileged owner).
fn boxlite_remove(root: &Path) {
    Command::new("chmod")
        .arg("-R")
        .arg("u+rwx")
        .arg(root)
        .status()
        .unwrap();
    fs::remove_dir_all(root).unwrap();
}
