//! Shared cases 31, 34 and 36 against boxlite's qcow2 layer, checked with the real qemu-img and
//! qemu-io. Needs `qemu-utils` (qemu-img, qemu-io) and python3.

mod disk_support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use boxlite::rootfs::chain::{self, ChainError};
use boxlite::rootfs::qcow2::{self, Qcow2Error};
use boxlite::rootfs::ImageFormat;
use disk_support::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn is_loop(err: &Qcow2Error) -> bool {
    matches!(
        err,
        Qcow2Error::Chain {
            source: ChainError::Loop { .. },
            ..
        }
    )
}

#[test]
fn case31_loops_are_refused_quickly_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_case("31-", d, &[]);
    let before = dir_names(d);

    for name in [
        "loop-self.qcow2",
        "loop-a.qcow2",
        "loop-b.qcow2",
        "loop-abs.qcow2",
    ] {
        let image = d.join(name);
        let started = Instant::now();
        let err = qcow2::verify_chain(&image, ImageFormat::Qcow2).unwrap_err();
        assert!(is_loop(&err), "{name}: {err:?}");
        let message = error_chain(&err);
        assert!(message.contains("loops"), "{name}: message {message:?}");

        let overlay = d.join(format!("over-{name}"));
        let err = qcow2::create_overlay(&overlay, &image, ImageFormat::Qcow2, None).unwrap_err();
        assert!(is_loop(&err), "overlay on {name}: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: not prompt"
        );
        assert!(!overlay.exists(), "{name}: an overlay was left behind");
        assert!(
            qcow2::check(&image).is_err(),
            "check must refuse {name} too"
        );
        assert!(qcow2::snapshot_create(&image, "s").is_err());
    }
    assert_eq!(dir_names(d), before, "no file of any kind left behind");
}

#[test]
fn case31_deep_chain_fails_cleanly_and_a_shallower_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_case("31-", d, &[]);
    let chain_dir = d.join("chain");
    qemu_img(&[
        "check",
        "-f",
        "qcow2",
        chain_dir.join("c001.qcow2").to_str().unwrap(),
    ]);

    let c100 = chain_dir.join("c100.qcow2");
    let err = qcow2::verify_chain(&c100, ImageFormat::Qcow2).unwrap_err();
    assert!(
        error_chain(&err).contains("backing chain too deep"),
        "{}",
        error_chain(&err)
    );
    let before = dir_names(&chain_dir);
    let overlay = chain_dir.join("top.qcow2");
    assert!(qcow2::create_overlay(&overlay, &c100, ImageFormat::Qcow2, None).is_err());
    assert_eq!(dir_names(&chain_dir), before, "nothing left behind");

    // Within the limit: 30 qcow2 levels over the raw base open and read through.
    let c030 = chain_dir.join("c030.qcow2");
    let links = qcow2::verify_chain(&c030, ImageFormat::Qcow2).unwrap();
    assert_eq!(links.len(), 31);
    assert_eq!(links.last().unwrap().format, ImageFormat::Raw);
    qcow2::create_overlay(&overlay, &c030, ImageFormat::Qcow2, None).unwrap();
    assert_check_clean(&overlay);
    let info = info_json(&overlay, "qcow2");
    assert_eq!(info["virtual-size"], 8 * MIB);
    assert_eq!(info["backing-filename"], "c030.qcow2", "stored relative");
    assert_eq!(&guest_bytes(&overlay, None)[..16], b"chain base data\n");

    // Flattening onto the raw base merges the 30 levels: the chain is 2 files, same content.
    let base = links.last().unwrap().clone();
    qcow2::flatten(&overlay, Some(&base)).unwrap();
    assert_eq!(
        qcow2::verify_chain(&overlay, ImageFormat::Qcow2)
            .unwrap()
            .len(),
        2
    );
    assert_check_clean(&overlay);
    assert_eq!(&guest_bytes(&overlay, None)[..16], b"chain base data\n");
    assert_eq!(
        info_json(&overlay, "qcow2")["backing-filename-format"],
        "raw"
    );
}

#[test]
fn case31_self_reference_is_refused_in_every_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    let p = d.join("disk.qcow2");

    // P does not exist yet: backing P under three spellings.
    let spellings = [
        p.clone(),
        d.join("sub/../disk.qcow2"),
        d.join("./disk.qcow2"),
    ];
    for backing in &spellings {
        let err = qcow2::create_overlay(&p, backing, ImageFormat::Qcow2, None).unwrap_err();
        assert!(
            matches!(err, Qcow2Error::SelfReference { .. }),
            "{backing:?}: {err:?}"
        );
        assert!(!p.exists());
    }
    let link = d.join("link.qcow2");
    symlink(&p, &link).unwrap();
    let err = qcow2::create_overlay(&p, &link, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(err, Qcow2Error::SelfReference { .. }), "{err:?}");
    let link2 = d.join("sub/link2.qcow2");
    symlink("../link.qcow2", &link2).unwrap();
    let err = qcow2::create_overlay(&p, &link2, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(err, Qcow2Error::SelfReference { .. }), "{err:?}");

    // P exists: "a snapshot overlay in place" is refused and P is untouched.
    qcow2::create(&p, 16 * MIB).unwrap();
    let before = std::fs::read(&p).unwrap();
    for backing in spellings.iter().chain([&link, &link2]) {
        let err = qcow2::create_overlay(&p, backing, ImageFormat::Qcow2, None).unwrap_err();
        assert!(
            matches!(err, Qcow2Error::SelfReference { .. }),
            "{backing:?}: {err:?}"
        );
    }
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_check_clean(&p);

    // An overlay over P placed elsewhere is fine; one at a taken path is refused.
    let top = d.join("sub/top.qcow2");
    qcow2::create_overlay(&top, &p, ImageFormat::Qcow2, None).unwrap();
    assert_check_clean(&top);
    let err = qcow2::create_overlay(&top, &p, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(err, Qcow2Error::AlreadyExists { .. }), "{err:?}");
    // A symlink at the overlay path counts as taken too (even a dangling one).
    let dangling = d.join("dangling.qcow2");
    symlink(d.join("nowhere"), &dangling).unwrap();
    let err = qcow2::create_overlay(&dangling, &p, ImageFormat::Qcow2, None).unwrap_err();
    assert!(matches!(err, Qcow2Error::AlreadyExists { .. }), "{err:?}");
    assert!(!d.join("nowhere").exists());
}

fn expected_sha(expected_json: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(expected_json).unwrap()).unwrap();
    let a = v["A"].as_array().unwrap();
    let line = a
        .iter()
        .find_map(|l| l.as_str()?.split("== ").nth(1))
        .unwrap();
    line.trim().to_string()
}

#[test]
fn case34_raw_backing_is_never_probed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sentinel = d.join("sentinel");
    std::fs::create_dir(&sentinel).unwrap();
    std::fs::write(sentinel.join("secret"), vec![0x5a; 2 * MIB as usize]).unwrap();
    generate_case("34-", d, &[sentinel.to_str().unwrap()]);
    let base = d.join("base.raw");
    // The trap is real: probing calls this raw file qcow2.
    let probed = qemu_img(&["info", "--output=json", base.to_str().unwrap()]);
    assert!(probed.contains("\"format\": \"qcow2\""), "{probed}");

    // A: explicit raw backing.
    let a = d.join("overlay-a.qcow2");
    qcow2::create_overlay(&a, &base, ImageFormat::Raw, None).unwrap();
    assert_check_clean(&a);
    let info = info_json(&a, "qcow2");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 2 * MIB);
    let header = chain::read_header(&a).unwrap().unwrap();
    assert_eq!(
        header.backing_format.as_deref(),
        Some("raw"),
        "0xE2792ACA extension"
    );
    let guest = guest_bytes(&a, None);
    assert_eq!(
        hex::encode(Sha256::digest(&guest)),
        expected_sha(&d.join("expected.json"))
    );
    assert_eq!(guest, std::fs::read(&base).unwrap());
    assert_eq!(&guest[..4], b"QFI\xfb");
    assert_eq!(&guest[MIB as usize..MIB as usize + 7], b"RAWMARK");
    assert!(!guest.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)));
    // Walking A's chain never parses the raw file as qcow2.
    let links = qcow2::verify_chain(&a, ImageFormat::Qcow2).unwrap();
    assert_eq!(links.len(), 2);
    assert_eq!(links[1].format, ImageFormat::Raw);

    // B: an overlay that does not record its backing format (the API cannot make one: the
    // format is a required argument; here we strip the extension from A's header).
    let b = d.join("overlay-b.qcow2");
    let mut bytes = std::fs::read(&a).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&b, bytes).unwrap();
    let err = qcow2::verify_chain(&b, ImageFormat::Qcow2).unwrap_err();
    let message = error_chain(&err);
    assert!(message.contains("without a backing format"), "{message}");
    let top = d.join("top-b.qcow2");
    assert!(qcow2::create_overlay(&top, &b, ImageFormat::Qcow2, None).is_err());
    assert!(!top.exists());
    assert!(qcow2::check(&b).is_err());
}

fn assert_all_clean(paths: &[&Path]) {
    for p in paths {
        assert_check_clean(p);
        let report = qcow2::check(p).unwrap();
        assert!(report.is_clean(), "{p:?}: {report:?}");
    }
}

#[test]
fn case36_created_images_pass_check_through_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let ov = d.join("ov.qcow2");
    let big = d.join("ov-big.qcow2");
    let b = base.to_str().unwrap();

    qcow2::create(&base, 64 * MIB).unwrap();
    assert_all_clean(&[&base]);
    assert_eq!(info_json(&base, "qcow2")["format"], "qcow2");
    assert_eq!(info_json(&base, "qcow2")["virtual-size"], 64 * MIB);

    qcow2::create_overlay(&ov, &base, ImageFormat::Qcow2, None).unwrap();
    qcow2::create_overlay(&big, &base, ImageFormat::Qcow2, Some(128 * MIB)).unwrap();
    assert_all_clean(&[&base, &ov, &big]);
    for (p, size) in [(&ov, 64 * MIB), (&big, 128 * MIB)] {
        let info = info_json(p, "qcow2");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["backing-filename"], "base.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
    }

    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 1M", b]);
    assert_all_clean(&[&base, &ov, &big]);
    qcow2::snapshot_create(&base, "s1").unwrap();
    assert_all_clean(&[&base, &ov, &big]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x22 0 64k", b]);
    assert_all_clean(&[&base, &ov, &big]);
    qcow2::snapshot_create(&base, "s2").unwrap();
    assert_all_clean(&[&base, &ov, &big]);

    let listed = qemu_img(&["snapshot", "-l", "-f", "qcow2", b]);
    assert!(listed.contains("s1") && listed.contains("s2"), "{listed}");
    let names: Vec<String> = qcow2::snapshots(&base)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s2"]);

    let mut expected_s1 = vec![0u8; 64 * MIB as usize];
    expected_s1[..MIB as usize].fill(0x11);
    assert!(guest_bytes(&base, Some("s1")) == expected_s1, "s1 content");
    let mut expected_active = expected_s1.clone();
    expected_active[..64 * 1024].fill(0x22);
    assert!(
        guest_bytes(&base, None) == expected_active,
        "active content"
    );
    assert!(
        guest_bytes(&base, Some("s2")) == expected_active,
        "s2 content"
    );

    // The snapshot is isolated: writes after it do not leak into it (OFLAG_COPIED handled).
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x33 0 64k", b]);
    assert!(guest_bytes(&base, Some("s2")) == expected_active);
    qcow2::snapshot_apply(&base, "s1").unwrap();
    assert!(guest_bytes(&base, None) == expected_s1, "reverted to s1");
    assert_all_clean(&[&base, &ov, &big]);
    qcow2::snapshot_delete(&base, "s2").unwrap();
    assert_all_clean(&[&base]);
    assert!(matches!(
        qcow2::snapshot_delete(&base, "s2"),
        Err(Qcow2Error::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        qcow2::snapshot_create(&base, "s1"),
        Err(Qcow2Error::SnapshotExists { .. })
    ));

    // Growth: bigger is fine, smaller refused.
    qcow2::grow(&ov, 96 * MIB).unwrap();
    assert_eq!(info_json(&ov, "qcow2")["virtual-size"], 96 * MIB);
    assert!(matches!(
        qcow2::grow(&ov, 32 * MIB),
        Err(Qcow2Error::Shrink { .. })
    ));
    assert_all_clean(&[&ov]);
}

/// The whole error chain on one line, as the CLI prints it.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
