//! Box disks over a shared base: thin provisioning, relative backing names (a home folder can
//! move), snapshots, clones that share what was written, deep-chain flattening, garbage
//! collection. Checked with the real qemu-img/qemu-io. Needs qemu-utils, e2fsprogs, busybox.

mod disk_support;

use std::io::Write;
use std::process::{Command, Stdio};

use boxlite::home::Home;
use boxlite::rootfs::disk::{self, BoxDisk, DiskError, DEFAULT_DISK_SIZE, FLATTEN_DEPTH};
use boxlite::rootfs::{base, gc, ImageFormat};
use disk_support::*;

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    home: Home,
    base: base::BaseDisk,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs");
    busybox_tree(&tree);
    let home = Home::open(dir.path().join("home")).unwrap();
    let base = base::ensure_base(&home, "img", &tree).unwrap();
    Fixture {
        _dir: dir,
        home,
        base,
    }
}

fn new_disk(f: &Fixture, id: &str) -> BoxDisk {
    BoxDisk::create(&f.home, id, &f.base.path, ImageFormat::Raw, None).unwrap();
    BoxDisk::open(&f.home, id).unwrap()
}

#[test]
fn box_disks_are_thin_and_share_the_base() {
    let f = fixture();
    let ext4_magic = guest_read_raw_base(&f);
    for i in 0..20 {
        let id = format!("box{i}");
        let path = BoxDisk::create(&f.home, &id, &f.base.path, ImageFormat::Raw, None).unwrap();
        assert_eq!(path, f.home.box_dir(&id).join("disk.qcow2"));
        assert!(
            allocated_bytes(&path) < MIB,
            "box disk after create: {}",
            allocated_bytes(&path)
        );
        if i % 5 == 0 {
            assert_check_clean(&path);
            let info = info_json(&path, "qcow2");
            assert_eq!(info["virtual-size"], DEFAULT_DISK_SIZE);
            assert_eq!(info["backing-filename"], "../../images/rootfs/img.raw");
            assert_eq!(info["backing-filename-format"], "raw");
            // The guest sees the base's ext4 superblock through the overlay.
            assert_eq!(guest_read(&path, 1024 + 56, 2), ext4_magic);
        }
    }
    let total = du_bytes(&f.home.boxes_dir());
    assert!(total < 20 * MIB, "20 box disks take {total} bytes");

    // Custom size; never below the base.
    let big = BoxDisk::create(
        &f.home,
        "big",
        &f.base.path,
        ImageFormat::Raw,
        Some(20 << 30),
    )
    .unwrap();
    assert_eq!(info_json(&big, "qcow2")["virtual-size"], 20u64 << 30);
    let tiny = BoxDisk::create(&f.home, "tiny", &f.base.path, ImageFormat::Raw, Some(MIB)).unwrap();
    assert_eq!(info_json(&tiny, "qcow2")["virtual-size"], f.base.size);
    // Creating twice is refused; bad ids are refused.
    assert!(BoxDisk::create(&f.home, "box0", &f.base.path, ImageFormat::Raw, None).is_err());
    for bad in ["../x", ".layers", "a/b", ""] {
        assert!(matches!(
            BoxDisk::create(&f.home, bad, &f.base.path, ImageFormat::Raw, None),
            Err(DiskError::InvalidBoxId(_))
        ));
    }
}

fn guest_read_raw_base(f: &Fixture) -> Vec<u8> {
    let bytes = std::fs::read(&f.base.path).unwrap();
    let magic = bytes[1024 + 56..1024 + 58].to_vec();
    assert_eq!(magic, [0x53, 0xef], "ext4 magic in the base");
    magic
}

#[test]
fn prepare_boot_repairs_leaks() {
    let f = fixture();
    let disk = new_disk(&f, "leaky");
    make_leak(disk.path());
    disk.prepare_boot().unwrap();
    assert_check_clean(disk.path());
    assert_eq!(guest_read(disk.path(), 1024 + 56, 2), [0x53, 0xef]);
}

#[test]
fn a_home_folder_can_move() {
    let f = fixture();
    let disk = new_disk(&f, "mover");
    guest_write(disk.path(), 8 * MIB, 4096, 0x5c);
    let old_root = f.home.root().to_path_buf();
    let new_root = old_root.with_file_name("moved-home");
    std::fs::rename(&old_root, &new_root).unwrap();
    let home = Home::open(&new_root).unwrap();
    let disk = BoxDisk::open(&home, "mover").unwrap();
    assert_eq!(disk.chain().unwrap().len(), 2);
    assert_eq!(guest_read(disk.path(), 8 * MIB, 4), [0x5c; 4]);
    assert_eq!(guest_read(disk.path(), 1024 + 56, 2), [0x53, 0xef]);
    assert_check_clean(disk.path());
}

#[test]
fn snapshots_restore_content() {
    let f = fixture();
    let disk = new_disk(&f, "snappy");
    guest_write(disk.path(), 100 * MIB, 64 * 1024, 0xaa);
    disk.snapshot_create("before").unwrap();
    assert_check_clean(disk.path());
    guest_write(disk.path(), 100 * MIB, 64 * 1024, 0xbb);
    guest_write(disk.path(), 200 * MIB, 4096, 0xcc);
    disk.snapshot_create("after").unwrap();
    let names: Vec<_> = disk
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["before", "after"]);

    disk.snapshot_restore("before").unwrap();
    assert_check_clean(disk.path());
    assert_eq!(guest_read(disk.path(), 100 * MIB, 4), [0xaa; 4]);
    assert_eq!(guest_read(disk.path(), 200 * MIB, 4), [0; 4]);
    disk.snapshot_restore("after").unwrap();
    assert_eq!(guest_read(disk.path(), 100 * MIB, 4), [0xbb; 4]);
    assert_eq!(guest_read(disk.path(), 200 * MIB, 4), [0xcc; 4]);
    disk.snapshot_delete("before").unwrap();
    assert_check_clean(disk.path());
    assert!(disk.snapshot_restore("before").is_err());
    assert!(
        disk.snapshot_create("after").is_err(),
        "duplicate names refused"
    );
    assert!(disk.snapshot_create("1").is_err(), "ids are not names");
}

#[test]
fn a_disk_held_by_a_vm_is_in_use() {
    let f = fixture();
    let disk = new_disk(&f, "busy");
    // qemu-io in interactive mode holds the image open (and QEMU's write lock) like a VM.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(disk.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(matches!(
        disk.ensure_stopped(),
        Err(DiskError::InUse { .. })
    ));
    let err = disk.snapshot_create("s").unwrap_err().to_string();
    assert!(err.contains("busy"), "{err}");
    assert!(disk.clone_to(&f.home, "busy-clone").is_err());
    assert!(!disk::disk_path(&f.home, "busy-clone").unwrap().exists());
    holder.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    holder.wait().unwrap();
    disk.ensure_stopped().unwrap();
    disk.snapshot_create("s").unwrap();
}

#[test]
fn clones_share_what_was_written_and_diverge() {
    let f = fixture();
    let a = new_disk(&f, "a");
    guest_write(a.path(), 300 * MIB, 8 * MIB, 0x11);
    let b = a.clone_to(&f.home, "b").unwrap();

    // Both see the source's writes; the written data lives once, in the frozen layer.
    for d in [&a, &b] {
        assert_eq!(guest_read(d.path(), 300 * MIB, 4), [0x11; 4]);
        assert_eq!(guest_read(d.path(), 1024 + 56, 2), [0x53, 0xef]);
        assert_check_clean(d.path());
        assert!(
            d.allocated_bytes().unwrap() < MIB,
            "a fresh overlay per box"
        );
        let chain = d.chain().unwrap();
        assert_eq!(chain.len(), 3, "overlay, frozen layer, base");
        assert_eq!(chain[2].format, ImageFormat::Raw);
    }
    let layers = dir_names(&disk::layers_dir(&f.home));
    assert_eq!(layers.len(), 1);
    assert_eq!(
        info_json(b.path(), "qcow2")["backing-filename"],
        format!("../.layers/{}", layers[0])
    );

    guest_write(b.path(), 300 * MIB, 4096, 0x22);
    guest_write(a.path(), 300 * MIB, 4096, 0x33);
    assert_eq!(guest_read(a.path(), 300 * MIB, 4), [0x33; 4]);
    assert_eq!(guest_read(b.path(), 300 * MIB, 4), [0x22; 4]);
    assert_eq!(guest_read(b.path(), 300 * MIB + 4096, 4), [0x11; 4]);
    assert!(a.clone_to(&f.home, "b").is_err(), "target taken");

    // gc: everything is referenced while the boxes exist.
    assert!(gc::unreferenced(&f.home, &[], &["a", "b"])
        .unwrap()
        .is_empty());
    let usage = gc::usage(&f.home, &["img"], &["a", "b"]);
    assert!(
        usage.layers >= 8 * MIB && usage.bases > 0 && usage.reclaimable == 0,
        "{usage:?}"
    );
    b.remove().unwrap();
    assert!(gc::unreferenced(&f.home, &["img"], &["a"])
        .unwrap()
        .is_empty());
    a.remove().unwrap();
    let mut gone = gc::unreferenced(&f.home, &[], &["a", "b"]).unwrap();
    gone.sort();
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(gone.iter().any(|p| p.ends_with("img.raw")));
    assert!(gc::unreferenced(&f.home, &["img"], &[]).unwrap().len() == 1);
}

#[test]
fn deep_clone_chains_are_flattened_without_losing_data() {
    let f = fixture();
    let mut current = new_disk(&f, "gen0");
    for i in 1..=FLATTEN_DEPTH + 1 {
        // Every generation writes its own stripe; a flatten must keep every stripe.
        guest_write(current.path(), (i as u64) * 16 * MIB, 4096, i as u8);
        current = current.clone_to(&f.home, &format!("gen{i}")).unwrap();
        assert!(current.chain().unwrap().len() <= FLATTEN_DEPTH);
    }
    for i in 1..=FLATTEN_DEPTH + 1 {
        assert_eq!(
            guest_read(current.path(), (i as u64) * 16 * MIB, 4),
            [i as u8; 4]
        );
    }
    assert_eq!(guest_read(current.path(), 1024 + 56, 2), [0x53, 0xef]);
    assert_check_clean(current.path());
}

#[test]
fn clone_with_snapshots_copies_and_interrupted_clone_is_finished() {
    let f = fixture();
    let a = new_disk(&f, "src");
    guest_write(a.path(), 50 * MIB, 4096, 0x44);
    a.snapshot_create("s1").unwrap();
    guest_write(a.path(), 50 * MIB, 4096, 0x45);
    let b = a.clone_to(&f.home, "copy").unwrap();
    assert_eq!(guest_read(b.path(), 50 * MIB, 4), [0x45; 4]);
    assert_eq!(b.chain().unwrap().len(), 2, "copy over the same base");
    b.snapshot_restore("s1").unwrap();
    assert_eq!(guest_read(b.path(), 50 * MIB, 4), [0x44; 4]);
    assert_eq!(
        guest_read(a.path(), 50 * MIB, 4),
        [0x45; 4],
        "source untouched"
    );
    assert_check_clean(b.path());

    // A crash between freezing and swapping leaves the disk hard-linked into .layers; opening
    // the box swaps in a fresh overlay so it never writes into the shared layer.
    let c = new_disk(&f, "crashy");
    guest_write(c.path(), 10 * MIB, 4096, 0x66);
    std::fs::create_dir_all(disk::layers_dir(&f.home)).unwrap();
    let layer = disk::layers_dir(&f.home).join("crashy-interrupted.qcow2");
    std::fs::hard_link(c.path(), &layer).unwrap();
    let c = BoxDisk::open(&f.home, "crashy").unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(c.path()).unwrap().nlink(), 1);
    assert_eq!(
        c.chain().unwrap()[1].canonical,
        std::fs::canonicalize(&layer).unwrap()
    );
    assert_eq!(guest_read(c.path(), 10 * MIB, 4), [0x66; 4]);
    assert_check_clean(c.path());
}
