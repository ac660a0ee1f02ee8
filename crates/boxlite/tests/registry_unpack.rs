//! `ImageManager::unpack` of pulled images equals `umoci unpack` of the same images: every test
//! image (one layer, added file, deletions by whiteout) in every transport format (OCI gzip,
//! zstd, Docker schema 2), pulled from a real registry.

#[path = "support/registry.rs"]
mod registry;
#[path = "support/testimages.rs"]
mod testimages;
#[path = "support/treecmp.rs"]
mod treecmp;

use std::process::Command;

use boxlite::home::Home;
use boxlite::images::manager::ImageManager;
use boxlite::images::pull::PullOptions;
use registry::{Auth, Registry};

#[test]
fn unpack_equals_umoci_unpack() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    let home_dir = tempfile::tempdir().unwrap();
    let images = ImageManager::new(&Home::open(home_dir.path()).unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let options = PullOptions {
        quiet: true,
        ..PullOptions::default()
    };

    for tag in ["base", "app", "del"] {
        let bundle = work.path().join(format!("umoci-{tag}"));
        let out = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", imgs.layout().display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected = treecmp::manifest(&bundle.join("rootfs"));

        for (format, extra) in [
            ("oci", &[][..]),
            (
                "zstd",
                &["--dest-compress-format", "zstd", "--dest-compress"][..],
            ),
            ("v2s2", &["--format", "v2s2"][..]),
        ] {
            let reference = format!("{}/unpack/{format}:{tag}", reg.host());
            reg.push(&imgs.source(tag), &format!("unpack/{format}:{tag}"), extra);
            images.pull(&reference, &options).unwrap();
            let dest = work.path().join(format!("boxlite-{format}-{tag}"));
            images.unpack(&reference, &dest).unwrap();
            let got = treecmp::manifest(&dest);
            let differences = treecmp::diff(
                &expected,
                &got,
                &treecmp::Compare {
                    mtimes: true,
                    xattrs: true,
                    ..Default::default()
                },
            );
            assert!(
                differences.is_empty(),
                "{reference}: boxlite unpack differs from umoci unpack:\n{}",
                differences.join("\n")
            );
        }
    }
    // The deletions of `del` took effect.
    let del = work.path().join("boxlite-oci-del");
    assert!(!del.join("usr/sbin").exists() && !del.join("etc/issue").exists());
    assert!(del.join("etc/app.conf").exists() && del.join("bin/busybox").exists());
}
