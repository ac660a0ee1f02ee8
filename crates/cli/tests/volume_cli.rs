//! `boxlite volume …` as a user scripts it: a fresh BOXLITE_HOME, the real binary, qemu-img to
//! look at what it made. Needs qemu-utils.

use std::path::Path;
use std::process::{Command, Output};

fn boxlite(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_boxlite"))
        .args(args)
        .env("BOXLITE_HOME", home)
        .output()
        .unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = boxlite(home, args);
    assert!(
        out.status.success(),
        "boxlite {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(home: &Path, args: &[&str]) -> String {
    let out = boxlite(home, args);
    assert_eq!(out.status.code(), Some(125), "boxlite {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn qemu_img_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found"));
}

fn qemu_io(args: &[&str]) -> String {
    let out = Command::new("qemu-io").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "{stdout}"
    );
    stdout
}

#[test]
fn volume_lifecycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();

    assert_eq!(
        ok(home, &["volume", "create", "data", "--size", "1G"]).trim(),
        "data"
    );
    let file = home.join("volumes/data/volume.qcow2");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        allocated < 2 << 20,
        "1 GiB volume takes {allocated} bytes on the host"
    );
    qemu_img_check_clean(&file);

    ok(home, &["volume", "create", "small", "--size", "512M"]);
    let list: serde_json::Value =
        serde_json::from_str(&ok(home, &["volume", "ls", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data", "small"]);
    assert_eq!(list[0]["size"], 1u64 << 30);
    assert_eq!(list[1]["size"], 512u64 << 20);
    let table = ok(home, &["volume", "ls"]);
    assert!(
        table.contains("data") && table.contains("1G") && table.contains("512M"),
        "{table}"
    );

    // Snapshot, change, revert: content goes back.
    let f = file.to_str().unwrap();
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x61 0 64k", f]);
    ok(home, &["volume", "snapshot", "data", "first"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x62 0 64k", f]);
    let snaps = ok(home, &["volume", "snapshots", "data"]);
    let line = snaps
        .lines()
        .find(|l| l.starts_with("first "))
        .expect(&snaps);
    let date = line.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "a date, not seconds since 1970: {snaps}"
    );
    ok(home, &["volume", "revert", "data", "first"]);
    qemu_io(&["-r", "-f", "qcow2", "-c", "read -P 0x61 0 64k", f]);
    qemu_img_check_clean(&file);
    let err = fails(home, &["volume", "snapshot", "data", "first"]);
    assert!(
        err.contains("already has a snapshot named \"first\""),
        "{err}"
    );
    let err = fails(home, &["volume", "revert", "data", "nope"]);
    assert!(err.contains("no snapshot named \"nope\""), "{err}");

    // A volume built on another: shares its data; the backing one can't go away.
    ok(home, &["volume", "create", "child", "--backing", "data"]);
    let child = home.join("volumes/child/volume.qcow2");
    qemu_io(&[
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0x61 0 64k",
        child.to_str().unwrap(),
    ]);
    qemu_img_check_clean(&child);
    let err = fails(home, &["volume", "rm", "data"]);
    assert!(err.contains("backing volume of child"), "{err}");
    let err = fails(
        home,
        &[
            "volume",
            "create",
            "tiny",
            "--backing",
            "data",
            "--size",
            "1M",
        ],
    );
    assert!(err.contains("at least"), "{err}");

    ok(home, &["volume", "snapshot", "rm", "data", "first"]);
    assert!(!ok(home, &["volume", "snapshots", "data"]).contains("first"));
    ok(home, &["volume", "rm", "child"]);
    ok(home, &["volume", "rm", "data"]);
    assert!(!home.join("volumes/data").exists());
    let list: serde_json::Value =
        serde_json::from_str(&ok(home, &["volume", "ls", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    for name in ["../x", "a/b", "..", ".hidden"] {
        let err = fails(home, &["volume", "create", name]);
        assert!(err.contains("invalid volume name"), "{name}: {err}");
    }
    let err = fails(home, &["volume", "create", "v", "--size", "ten"]);
    assert!(err.contains("invalid size"), "{err}");
    let err = fails(home, &["volume", "rm", "ghost"]);
    assert!(err.contains("no volume named ghost"), "{err}");
    ok(home, &["volume", "create", "v"]);
    let err = fails(home, &["volume", "create", "v"]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails(home, &["volume", "snapshot", "v", "12"]);
    assert!(err.contains("invalid snapshot name"), "{err}");
    let err = fails(home, &["volume", "create", "w", "--backing", "ghost"]);
    assert!(err.contains("no volume named ghost"), "{err}");
    assert!(!home.join("volumes/w").exists());
}
