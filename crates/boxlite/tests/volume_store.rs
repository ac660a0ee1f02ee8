//! Volume leases and the rules around them, through the library API the runtime uses.
//! Needs qemu-utils.

mod disk_support;

use boxlite::home::Home;
use boxlite::volumes::{VolumeError, Volumes};
use boxlite_protocol::MountSource;
use disk_support::*;

#[test]
fn leases_keep_writers_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path()).unwrap();
    let mut vols = Volumes::open(&home).unwrap();
    vols.create("db", Some(1 << 30), None).unwrap();

    let lease = vols.acquire("db", "box-a", true).unwrap();
    assert_eq!(lease.path, home.volume_dir("db").join("volume.qcow2"));
    assert!(lease.serial.starts_with("vol-") && lease.serial.len() <= 20);
    let spec = lease.mount_spec("/var/lib/db");
    assert!(!spec.readonly);
    assert!(matches!(
        spec.source,
        MountSource::Block { ref fstype, format_if_empty: true, .. } if fstype == "ext4"
    ));
    assert_eq!(
        vols.acquire("db", "box-a", true).unwrap(),
        lease,
        "idempotent"
    );

    // A second Box, read-write or read-only: refused, naming the holder.
    for rw in [true, false] {
        let err = vols.acquire("db", "box-b", rw).unwrap_err();
        assert!(matches!(err, VolumeError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("box-a"), "{err}");
    }
    // While held: no removal, no snapshots, no revert.
    let err = vols.remove("db").unwrap_err();
    assert!(err.to_string().contains("in use by box box-a"), "{err}");
    assert!(matches!(
        vols.snapshot("db", "s"),
        Err(VolumeError::InUse { .. })
    ));
    assert!(
        vols.create("over-db", None, Some("db")).is_err(),
        "backing on a volume being written"
    );
    let listed = vols.get("db").unwrap();
    assert_eq!(listed.in_use_by.len(), 1);
    assert!(listed.in_use_by[0].read_write);

    vols.release("db", "box-a").unwrap();
    vols.snapshot("db", "s").unwrap();
    // Readers share.
    vols.acquire("db", "box-b", false).unwrap();
    vols.acquire("db", "box-c", false).unwrap();
    assert!(vols.acquire("db", "box-d", true).is_err());
    assert!(
        vols.snapshot_remove("db", "s").is_err(),
        "snapshot rm refused while in use"
    );
    vols.release_box("box-b").unwrap();
    vols.release_box("box-c").unwrap();
    vols.snapshot_remove("db", "s").unwrap();
    assert_check_clean(&home.volume_dir("db").join("volume.qcow2"));

    // A backing volume attaches read-only only.
    vols.create("db-copy", None, Some("db")).unwrap();
    assert_eq!(vols.get("db-copy").unwrap().size, 1 << 30);
    let err = vols.acquire("db", "box-e", true).unwrap_err();
    assert!(
        err.to_string().contains("backing volume of db-copy"),
        "{err}"
    );
    vols.acquire("db", "box-e", false).unwrap();
    vols.acquire("db-copy", "box-f", true).unwrap();
    assert_check_clean(&home.volume_dir("db-copy").join("volume.qcow2"));
    assert_eq!(
        info_json(&home.volume_dir("db-copy").join("volume.qcow2"), "qcow2")["backing-filename"],
        "../db/volume.qcow2"
    );
}

#[test]
fn state_survives_reopening_and_stale_folders_are_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path()).unwrap();
    {
        let mut vols = Volumes::open(&home).unwrap();
        vols.create("keep", Some(64 << 20), None).unwrap();
        vols.acquire("keep", "b1", true).unwrap();
    }
    // A crash mid-create leaves a folder without a row.
    std::fs::create_dir_all(home.volume_dir("half")).unwrap();
    std::fs::write(home.volume_dir("half").join("volume.qcow2"), b"junk").unwrap();
    let mut vols = Volumes::open(&home).unwrap();
    assert_eq!(vols.get("keep").unwrap().in_use_by[0].box_id, "b1");
    vols.create("half", Some(64 << 20), None).unwrap();
    assert_check_clean(&home.volume_dir("half").join("volume.qcow2"));
    let names: Vec<_> = vols.list().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["half", "keep"]);

    // The runtime sweeps leases of Boxes that no longer run.
    vols.acquire("half", "b2", false).unwrap();
    let released = vols.release_stale(&["b2"]).unwrap();
    assert_eq!(released, [("keep".to_string(), "b1".to_string())]);
    assert!(vols.get("keep").unwrap().in_use_by.is_empty());
    assert_eq!(vols.get("half").unwrap().in_use_by.len(), 1);
}

#[test]
fn leaks_from_a_crash_are_repaired_and_corruption_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path()).unwrap();
    let mut vols = Volumes::open(&home).unwrap();
    vols.create("crashed", Some(64 << 20), None).unwrap();
    let path = home.volume_dir("crashed").join("volume.qcow2");
    make_leak(&path);
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "the leak is real");
    vols.acquire("crashed", "b", true).unwrap();
    assert_check_clean(&path);
    vols.release("crashed", "b").unwrap();

    // Corruption (an L1 entry pointing past the end of the file) is refused, not "repaired".
    vols.create("broken", Some(64 << 20), None).unwrap();
    let path = home.volume_dir("broken").join("volume.qcow2");
    let bytes = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let mut bytes = bytes;
    let bogus: u64 = (1 << 63) | (1000 * 65536);
    bytes[l1..l1 + 8].copy_from_slice(&bogus.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = vols.acquire("broken", "b", true).unwrap_err();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(message.contains("qemu-img check"), "{message}");
    assert!(vols.get("broken").unwrap().in_use_by.is_empty());
}
