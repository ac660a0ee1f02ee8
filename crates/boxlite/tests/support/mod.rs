//! Shared helpers for the layer tests: running the case generators from `shared/cases`, a
//! layer cache in a temporary home, a raw tar writer for hostile layers, and tree comparison.
#![allow(dead_code)]

pub mod treecmp;

use std::path::{Path, PathBuf};
use std::process::Command;

use boxlite::home::Home;
use boxlite::images::assemble::{assemble, AssembleError, AssembleMode, AssembleStats};
use boxlite::images::digest::{DiffId, Digest};
use boxlite::images::storage::{ImageStorage, LayerBlob, LayerInfo, Limits, StorageError};

/// The generator `NN-*.py` from `<repo>/../shared/cases`, else `/work/shared/cases`.
pub fn case_script(number: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in [
        repo.join("../shared/cases"),
        PathBuf::from("/work/shared/cases"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{number}-")) && name.ends_with(".py") {
                    return e.path();
                }
            }
        }
    }
    panic!("case generator {number}-*.py not found beside the repository or in /work/shared/cases");
}

/// Runs case `number`'s generator into `out` with extra arguments; returns its expected.json.
pub fn run_case(number: &str, out: &Path, args: &[&str]) -> serde_json::Value {
    let script = case_script(number);
    let status = Command::new("python3")
        .arg(&script)
        .arg(out)
        .args(args)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "{} failed", script.display());
    let text = std::fs::read_to_string(out.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A layer cache in a temporary home folder.
pub struct Cache {
    pub tmp: tempfile::TempDir,
    pub home: Home,
    pub storage: ImageStorage,
}

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

impl Cache {
    pub fn new() -> Cache {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path().join("home")).unwrap();
        let storage = ImageStorage::new(&home);
        Cache { tmp, home, storage }
    }

    /// Adds an uncompressed tar as a layer (its diff_id is its sha256).
    pub fn add_tar(&self, tar: &Path) -> Result<LayerInfo, StorageError> {
        let bytes = std::fs::read(tar).unwrap();
        let digest = Digest::of(&bytes);
        let blob = LayerBlob {
            path: tar,
            media_type: TAR,
            digest: &digest,
        };
        self.storage
            .ensure_layer(&blob, &digest, &Limits::default())
    }

    /// Adds tar bytes as a layer.
    pub fn add_bytes(&self, bytes: &[u8]) -> Result<LayerInfo, StorageError> {
        let path = self
            .tmp
            .path()
            .join(format!("layer-{}.tar", Digest::of(bytes).hex()));
        std::fs::write(&path, bytes).unwrap();
        self.add_tar(&path)
    }

    /// Adds the tars and assembles them, bottom first, into a fresh directory.
    pub fn stack(
        &self,
        tars: &[PathBuf],
        mode: AssembleMode,
    ) -> (PathBuf, Result<AssembleStats, AssembleError>) {
        let ids: Vec<DiffId> = tars
            .iter()
            .map(|t| self.add_tar(t).unwrap().diff_id)
            .collect();
        self.assemble(&ids, mode)
    }

    pub fn assemble(
        &self,
        ids: &[DiffId],
        mode: AssembleMode,
    ) -> (PathBuf, Result<AssembleStats, AssembleError>) {
        let dest = self.tmp.path().join(format!("rootfs-{}", unique()));
        let result = assemble(&self.storage, ids, &dest, mode);
        (dest, result)
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// One member for [`tar_bytes`]. Names and targets are raw bytes, written as given (no
/// cleaning: these tars are meant to be hostile).
#[derive(Clone, Default)]
pub struct Member {
    pub name: Vec<u8>,
    /// Tar typeflag: b'0' file, b'1' hardlink, b'2' symlink, b'3' char, b'4' block, b'5' dir,
    /// b'6' FIFO.
    pub kind: u8,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub dev: (u32, u32),
    /// Extra pax records.
    pub pax: Vec<(String, Vec<u8>)>,
}

pub fn file(name: &str, data: &[u8], mode: u32) -> Member {
    Member {
        name: name.into(),
        kind: b'0',
        data: data.to_vec(),
        mode,
        ..Member::default()
    }
}

pub fn dir(name: &str, mode: u32) -> Member {
    Member {
        name: name.into(),
        kind: b'5',
        mode,
        ..Member::default()
    }
}

pub fn symlink(name: &str, target: &str) -> Member {
    Member {
        name: name.into(),
        kind: b'2',
        link: target.into(),
        mode: 0o777,
        ..Member::default()
    }
}

pub fn hardlink(name: &str, target: &str) -> Member {
    Member {
        name: name.into(),
        kind: b'1',
        link: target.into(),
        mode: 0o644,
        ..Member::default()
    }
}

/// A pax tar of `members` (long names and targets go in pax records).
pub fn tar_bytes(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let mut pax = m.pax.clone();
        if m.name.len() > 100 {
            pax.push(("path".into(), m.name.clone()));
        }
        if m.link.len() > 100 {
            pax.push(("linkpath".into(), m.link.clone()));
        }
        if !pax.is_empty() {
            let mut records = Vec::new();
            for (k, v) in &pax {
                let body_len = k.len() + v.len() + 3;
                let mut len = body_len + 1;
                while len.to_string().len() + body_len != len {
                    len += 1;
                }
                records.extend_from_slice(format!("{len} {k}=").as_bytes());
                records.extend_from_slice(v);
                records.push(b'\n');
            }
            push_header(
                &mut out,
                b"PaxHeader",
                b'x',
                b"",
                records.len() as u64,
                0o644,
                0,
                0,
                (0, 0),
            );
            push_data(&mut out, &records);
        }
        push_header(
            &mut out,
            &m.name[..m.name.len().min(100)],
            m.kind,
            &m.link[..m.link.len().min(100)],
            m.data.len() as u64,
            m.mode,
            m.uid,
            m.gid,
            m.dev,
        );
        push_data(&mut out, &m.data);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[allow(clippy::too_many_arguments)]
fn push_header(
    out: &mut Vec<u8>,
    name: &[u8],
    kind: u8,
    link: &[u8],
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    dev: (u32, u32),
) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h.set_device_major(dev.0).unwrap();
    h.set_device_minor(dev.1).unwrap();
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

/// Every path component under `root` (for "no `.wh.` anywhere" checks).
pub fn all_names(root: &Path) -> Vec<String> {
    treecmp::manifest(root)
        .into_iter()
        .map(|e| e.path)
        .collect()
}

/// An image read from an OCI image layout (`index.json`, blobs by digest): enough to feed
/// `ensure_layer` and `assemble` the way the pull code does.
#[derive(Debug)]
pub struct LayoutImage {
    /// (blob path, media type, blob digest) per layer, bottom first.
    pub layers: Vec<(PathBuf, String, Digest)>,
    pub diff_ids: Vec<DiffId>,
}

/// Reads the image tagged `tag` (or the only one) from the OCI layout at `dir`.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> LayoutImage {
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap()
    };
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let index = json(dir.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    let desc = manifests
        .iter()
        .find(|m| match tag {
            Some(t) => m["annotations"]["org.opencontainers.image.ref.name"] == t,
            None => true,
        })
        .expect("image in index.json");
    let manifest = json(blob(desc["digest"].as_str().unwrap()));
    let config = json(blob(manifest["config"]["digest"].as_str().unwrap()));
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let d = l["digest"].as_str().unwrap();
            (
                blob(d),
                l["mediaType"].as_str().unwrap().to_string(),
                d.parse().unwrap(),
            )
        })
        .collect();
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    LayoutImage { layers, diff_ids }
}

impl Cache {
    /// Extracts every layer of `image` with `limits`; returns the diff_ids.
    pub fn add_image(
        &self,
        image: &LayoutImage,
        limits: &Limits,
    ) -> Result<Vec<DiffId>, StorageError> {
        let mut ids = Vec::new();
        for ((path, media_type, digest), diff_id) in image.layers.iter().zip(&image.diff_ids) {
            let blob = LayerBlob {
                path,
                media_type,
                digest,
            };
            ids.push(self.storage.ensure_layer(&blob, diff_id, limits)?.diff_id);
        }
        Ok(ids)
    }
}
