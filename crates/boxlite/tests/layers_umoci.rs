//! boxlite's extraction and assembly against a reference implementation: a three-layer image
//! built with umoci from real files (deletions, setuid, owners, hardlinks, symlinks, FIFO,
//! devices, xattrs, long names, opaque re-creation), then `umoci unpack` of the same image and
//! our `ensure_layer` + `assemble` must produce the same tree: paths, types, modes, owners,
//! symlink targets, content hashes, hardlink groups, device numbers, xattrs and mtimes.
//! Needs root and `umoci` (Debian package `umoci`).

mod support;

use std::path::Path;
use std::process::Command;

use boxlite::images::assemble::AssembleMode;
use boxlite::images::storage::Limits;
use support::treecmp::{diff, manifest, Compare};
use support::{read_layout, Cache};

#[test]
fn matches_umoci_unpack() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "compares the privileged paths: run as root"
    );
    let work = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/umoci-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(work.path())
        .arg(&repo)
        .output()
        .expect("bash runs (and umoci is installed)");
    assert!(
        out.status.success(),
        "building the image with umoci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let image = read_layout(&work.path().join("layout"), Some("img"));
    assert_eq!(image.layers.len(), 4);
    let reference = manifest(&work.path().join("ref/rootfs"));
    assert!(reference.len() > 300, "the reference tree is a real rootfs");

    let cache = Cache::new();
    let ids = cache.add_image(&image, &Limits::default()).unwrap();
    assert_eq!(cache.storage.extractions(), 4);
    let cmp = Compare {
        mtimes: true,
        root_attrs: false,
        xattrs: true,
        ignore_xattr_prefixes: vec![],
    };
    let cache_before: Vec<_> = ids
        .iter()
        .map(|d| manifest(&cache.storage.layer_root(d)))
        .collect();
    for mode in [AssembleMode::Copy, AssembleMode::Link] {
        let (root, stats) = cache.assemble(&ids, mode);
        let stats = stats.unwrap();
        assert_eq!(stats.layers, 4);
        let ours = manifest(&root);
        let differences = diff(&ours, &reference, &cmp);
        assert!(
            differences.is_empty(),
            "{mode:?}: {} differences from umoci unpack (left: boxlite, right: umoci):\n{}",
            differences.len(),
            differences.join("\n")
        );
    }
    // Link mode shares inodes with the cache and must never have changed one.
    for (d, before) in ids.iter().zip(&cache_before) {
        let after = manifest(&cache.storage.layer_root(d));
        let changed = diff(
            &after,
            before,
            &Compare {
                root_attrs: true,
                ..cmp.clone()
            },
        );
        assert!(
            changed.is_empty(),
            "layer cache {d} changed:\n{}",
            changed.join("\n")
        );
    }
    // A second image with the same layers extracts nothing.
    cache.add_image(&image, &Limits::default()).unwrap();
    assert_eq!(cache.storage.extractions(), 4);
}
