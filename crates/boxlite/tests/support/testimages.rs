//! Test support: real OCI images made by real tools. `scripts/make-busybox-rootfs.sh` makes a
//! busybox tree; `umoci` turns it into images in one OCI layout:
//! - `base`: one layer, the busybox tree; config Cmd `/bin/sh`, Env `GREETING=hello`,
//!   WorkingDir `/home/tester`, User `tester`, ExposedPorts `8080/tcp`, a label;
//! - `app`: `base` plus a layer adding `/etc/app.conf`;
//! - `del`: `app` plus a layer deleting `/usr/sbin` (a directory) and `/etc/issue` (whiteouts);
//! - `arm`: `base` with architecture arm64 in its config (for multi-platform indexes).
//!
//! [`multi_platform_layout`] writes an index over `base` (linux/amd64) and `arm` (linux/arm64)
//! by hand, over the same blobs.
//!
//! Use with `#[path = "support/testimages.rs"] mod testimages;`. Needs umoci and busybox-static.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

/// A built OCI layout holding the test images.
pub struct TestImages {
    pub dir: tempfile::TempDir,
}

impl TestImages {
    /// The layout folder (`oci:<layout>:<tag>` for skopeo).
    pub fn layout(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    /// A skopeo source reference for `tag`.
    pub fn source(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.layout().display())
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `base`, `app`, `del` and `arm` (see the module doc).
pub fn build() -> TestImages {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = |tag: &str| format!("{}:{tag}", d.join("oci").display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(d.join("oci")));
    run(Command::new("umoci").args(["new", "--image", &image("base")]));
    let bundle = d.join("b1");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image("base")])
        .arg(&bundle));
    run(Command::new("bash")
        .arg(repo_root().join("scripts/make-busybox-rootfs.sh"))
        .arg(bundle.join("rootfs")));
    run(Command::new("umoci")
        .args(["repack", "--image", &image("base")])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image("base"),
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/home/tester",
        "--config.user",
        "tester",
        "--config.exposedports",
        "8080/tcp",
        "--config.label",
        "org.boxlite.test=base",
    ]));

    // Not `umoci insert`: umoci 0.4.7 writes that layer's tar without its padding and end
    // blocks (GNU tar: "Unexpected EOF in archive").
    let bundle_app = d.join("b-app");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image("base")])
        .arg(&bundle_app));
    std::fs::write(bundle_app.join("rootfs/etc/app.conf"), "app=1\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image("app")])
        .arg(&bundle_app));

    let bundle2 = d.join("b2");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image("app")])
        .arg(&bundle2));
    std::fs::remove_dir_all(bundle2.join("rootfs/usr/sbin")).unwrap();
    std::fs::remove_file(bundle2.join("rootfs/etc/issue")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image("del")])
        .arg(&bundle2));

    run(Command::new("umoci").args([
        "config",
        "--image",
        &image("base"),
        "--tag",
        "arm",
        "--architecture",
        "arm64",
    ]));
    TestImages { dir }
}

/// The manifest descriptor JSON of `tag` in the layout's index.json.
pub fn descriptor(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {}", layout.display()))
        .clone()
}

/// A JSON blob of the layout.
pub fn read_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").unwrap();
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

/// Adds tag `multi` to the layout: an image index with `base` as linux/amd64 and `arm` as
/// linux/arm64. Returns the index digest.
pub fn add_multi_platform_index(layout: &Path) -> String {
    let mut entries = Vec::new();
    for (tag, arch) in [("base", "amd64"), ("arm", "arm64")] {
        let mut d = descriptor(layout, tag);
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        entries.push(d);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let hex = hex::encode(Sha256::digest(&bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), &bytes).unwrap();
    let index_path = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    std::fs::write(&index_path, serde_json::to_vec(&top).unwrap()).unwrap();
    format!("sha256:{hex}")
}
