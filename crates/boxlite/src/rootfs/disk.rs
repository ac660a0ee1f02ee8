//! The disk of one Box: `boxes/<box id>/disk.qcow2`, a thin qcow2 overlay over the image's
//! shared base disk (or over frozen layers of the Box it was cloned from).
//!
//! - Create: an overlay of the requested virtual size (default 10 GiB) over the base; it costs a
//!   few hundred KiB until the guest writes. The guest grows its ext4 online to the device size.
//! - Snapshots: internal qcow2 snapshots of the overlay (`qemu-img snapshot`), taken, listed,
//!   restored and deleted while the Box is stopped.
//! - Clone: the source's overlay becomes an immutable layer under `boxes/.layers/`, and two fresh
//!   overlays go on top of it, one for each Box; the clone shares everything written so far and
//!   costs only new writes. `boxes/.layers/` sits beside the Box folders, so relative backing
//!   names (`../../images/rootfs/x.raw`, `../.layers/y.qcow2`) mean the same from both places and
//!   freezing is a plain rename, no header rewrite. A source with internal snapshots is cloned by
//!   copying its overlay file instead (the copy carries the snapshots too). Chains deeper than
//!   [`FLATTEN_DEPTH`] are flattened onto the base.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::home::Home;
use crate::rootfs::chain::ChainLink;
use crate::rootfs::qcow2::{self, Qcow2Error};
use crate::rootfs::qemu_img::{self, ImageFormat, SnapshotInfo};

/// Virtual size of a Box disk unless the user asks otherwise (`--disk-size`).
pub const DEFAULT_DISK_SIZE: u64 = 10 << 30;
/// A new overlay whose chain has more files than this is flattened onto the base disk.
pub const FLATTEN_DEPTH: usize = 8;
/// File name of a Box's disk inside its folder.
pub const DISK_FILE: &str = "disk.qcow2";
/// Folder, beside the Box folders, of frozen layers shared by clones.
pub const LAYERS_DIR: &str = ".layers";

/// A failed Box disk operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The Box id cannot name a folder.
    #[error(
        "invalid box id {0:?} (expected letters, digits, '.', '_', '-', not starting with '.')"
    )]
    InvalidBoxId(String),
    /// The Box has no disk.
    #[error("box {box_id} has no disk at {path}")]
    NotFound { box_id: String, path: PathBuf },
    /// The target Box of a clone already has a disk.
    #[error("box {box_id} already has a disk at {path}")]
    Exists { box_id: String, path: PathBuf },
    /// A running VM holds the disk.
    #[error("the disk of box {box_id} is in use (is the box running?)")]
    InUse {
        box_id: String,
        #[source]
        source: qemu_img::ToolError,
    },
    /// A qcow2 operation failed.
    #[error("disk of box {box_id}")]
    Qcow2 {
        box_id: String,
        #[source]
        source: Box<Qcow2Error>,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DiskError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `box_id` can name a folder under `boxes/`.
pub fn validate_box_id(box_id: &str) -> Result<()> {
    let ok = !box_id.is_empty()
        && box_id.len() <= 128
        && !box_id.starts_with('.')
        && box_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(DiskError::InvalidBoxId(box_id.to_string()))
    }
}

/// `boxes/<box id>/disk.qcow2`.
pub fn disk_path(home: &Home, box_id: &str) -> Result<PathBuf> {
    validate_box_id(box_id)?;
    Ok(home.box_dir(box_id).join(DISK_FILE))
}

/// `boxes/.layers/`: frozen layers shared by cloned Boxes.
pub fn layers_dir(home: &Home) -> PathBuf {
    home.boxes_dir().join(LAYERS_DIR)
}

/// The disk of one Box. Cheap to hold; every operation goes to the file.
#[derive(Debug, Clone)]
pub struct BoxDisk {
    box_id: String,
    path: PathBuf,
}

impl BoxDisk {
    /// Creates the disk of `box_id` over `base` (opened as `base_format`), with virtual size
    /// `size` (default [`DEFAULT_DISK_SIZE`], never below the base's size). Returns its path.
    ///
    /// Attach it to the VM as format qcow2 (never probed) with serial `root`.
    pub fn create(
        home: &Home,
        box_id: &str,
        base: &Path,
        base_format: ImageFormat,
        size: Option<u64>,
    ) -> Result<PathBuf> {
        let path = disk_path(home, box_id)?;
        let dir = home.box_dir(box_id);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let size = size.unwrap_or(DEFAULT_DISK_SIZE);
        let wrap = |source| DiskError::Qcow2 {
            box_id: box_id.to_string(),
            source: Box::new(source),
        };
        // Never smaller than the base filesystem.
        let base_len = std::fs::metadata(base).map_err(io_err("stat", base))?.len();
        qcow2::create_overlay(&path, base, base_format, Some(size.max(base_len))).map_err(wrap)?;
        tracing::info!(box_id, path = %path.display(), size, "created box disk");
        Ok(path)
    }

    /// The existing disk of `box_id`, its backing chain verified. Finishes a clone that a crash
    /// interrupted (the source still sharing its file with a frozen layer).
    pub fn open(home: &Home, box_id: &str) -> Result<BoxDisk> {
        let path = disk_path(home, box_id)?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(DiskError::NotFound {
                box_id: box_id.to_string(),
                path,
            });
        }
        let disk = BoxDisk {
            box_id: box_id.to_string(),
            path,
        };
        disk.finish_interrupted_freeze(home)?;
        disk.chain()?;
        Ok(disk)
    }

    pub fn box_id(&self) -> &str {
        &self.box_id
    }

    /// The overlay file (`boxes/<id>/disk.qcow2`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn wrap(&self) -> impl FnOnce(Qcow2Error) -> DiskError + '_ {
        move |source| DiskError::Qcow2 {
            box_id: self.box_id.clone(),
            source: Box::new(source),
        }
    }

    /// The verified backing chain, this disk first and the base disk last.
    pub fn chain(&self) -> Result<Vec<ChainLink>> {
        qcow2::verify_chain(&self.path, ImageFormat::Qcow2).map_err(self.wrap())
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> Result<u64> {
        Ok(qcow2::info(&self.path).map_err(self.wrap())?.virtual_size)
    }

    /// Bytes this disk's own file occupies on the host (its writes, not the shared layers).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let meta = std::fs::metadata(&self.path).map_err(io_err("stat", &self.path))?;
        Ok(meta.blocks() * 512)
    }

    /// Grows the virtual size (the guest grows its filesystem online at the next start).
    pub fn grow(&self, size: u64) -> Result<()> {
        qcow2::grow(&self.path, size).map_err(self.wrap())
    }

    /// Readies the disk of a Box about to start: refuses a corrupt image and repairs leaked
    /// clusters a crash may have left (see [`qcow2::check_and_repair_leaks`]).
    pub fn prepare_boot(&self) -> Result<()> {
        qcow2::check_and_repair_leaks(&self.path)
            .map(drop)
            .map_err(self.wrap())
    }

    /// Takes snapshot `name` of a stopped Box's disk.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        qcow2::snapshot_create(&self.path, name).map_err(self.wrap())
    }

    /// The disk's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        qcow2::snapshots(&self.path).map_err(self.wrap())
    }

    /// Returns a stopped Box's disk to snapshot `name` (later writes are discarded).
    pub fn snapshot_restore(&self, name: &str) -> Result<()> {
        qcow2::snapshot_apply(&self.path, name).map_err(self.wrap())
    }

    /// Deletes snapshot `name` of a stopped Box's disk.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        qcow2::snapshot_delete(&self.path, name).map_err(self.wrap())
    }

    /// Fails with [`DiskError::InUse`] when a VM holds the disk: opening it for writing with
    /// `qemu-io` takes QEMU's image lock, which a running VM holds.
    pub fn ensure_stopped(&self) -> Result<()> {
        qemu_img::qemu_io(&[
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-c".as_ref(),
            "info".as_ref(),
            self.path.as_os_str(),
        ])
        .map(drop)
        .map_err(|source| DiskError::InUse {
            box_id: self.box_id.clone(),
            source,
        })
    }

    /// Gives `new_box_id` a disk with this (stopped) Box's current contents and returns it.
    ///
    /// Without internal snapshots the two Boxes share what was written so far (the current
    /// overlay is frozen into `boxes/.layers/` and each Box gets a fresh overlay); with
    /// snapshots, the clone gets a byte copy of this overlay (its writes and snapshots).
    pub fn clone_to(&self, home: &Home, new_box_id: &str) -> Result<BoxDisk> {
        let target = disk_path(home, new_box_id)?;
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(DiskError::Exists {
                box_id: new_box_id.to_string(),
                path: target,
            });
        }
        self.ensure_stopped()?;
        self.chain()?;
        let target_dir = home.box_dir(new_box_id);
        std::fs::create_dir_all(&target_dir).map_err(io_err("create", &target_dir))?;
        let size = self.virtual_size()?;
        let new_wrap = |source| DiskError::Qcow2 {
            box_id: new_box_id.to_string(),
            source: Box::new(source),
        };

        if !self.snapshots()?.is_empty() {
            copy_own_writes(&self.path, &target).map_err(new_wrap)?;
        } else {
            let layer = self.freeze(home)?;
            if let Err(e) = qcow2::create_overlay(&target, &layer, ImageFormat::Qcow2, Some(size)) {
                // Nothing uses the layer yet: undo the freeze.
                let _ = std::fs::remove_file(&layer);
                return Err(new_wrap(e));
            }
            self.replace_with_overlay(&layer, size)?;
        }
        let clone = BoxDisk {
            box_id: new_box_id.to_string(),
            path: target,
        };
        clone.flatten_if_deep()?;
        self.flatten_if_deep()?;
        tracing::info!(from = %self.box_id, to = new_box_id, "cloned box disk");
        Ok(clone)
    }

    /// Hard-links the current overlay into `boxes/.layers/<unique>.qcow2`; the source keeps
    /// the same file until [`Self::replace_with_overlay`] swaps in a fresh overlay.
    fn freeze(&self, home: &Home) -> Result<PathBuf> {
        let dir = layers_dir(home);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let layer = dir.join(format!("{}-{}.qcow2", self.box_id, unique_suffix()));
        std::fs::hard_link(&self.path, &layer).map_err(io_err("freeze", &layer))?;
        Ok(layer)
    }

    /// Atomically replaces this disk's file by a fresh overlay over `layer`.
    fn replace_with_overlay(&self, layer: &Path, size: u64) -> Result<()> {
        let tmp = qcow2::temp_sibling(&self.path);
        let _ = std::fs::remove_file(&tmp);
        qcow2::create_overlay(&tmp, layer, ImageFormat::Qcow2, Some(size)).map_err(self.wrap())?;
        std::fs::rename(&tmp, &self.path).map_err(io_err("replace", &self.path))?;
        Ok(())
    }

    /// If this disk's file is also a frozen layer (a clone was interrupted between freezing and
    /// swapping), swaps in a fresh overlay so the Box never writes into a shared layer.
    fn finish_interrupted_freeze(&self, home: &Home) -> Result<()> {
        let meta = std::fs::metadata(&self.path).map_err(io_err("stat", &self.path))?;
        if meta.nlink() < 2 {
            return Ok(());
        }
        let Ok(entries) = std::fs::read_dir(layers_dir(home)) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.ino() == meta.ino() && m.dev() == meta.dev() {
                tracing::warn!(box_id = %self.box_id, "finishing an interrupted disk clone");
                let size = self.virtual_size()?;
                return self.replace_with_overlay(&entry.path(), size);
            }
        }
        Ok(())
    }

    /// Flattens this disk onto the base disk when its chain is deeper than [`FLATTEN_DEPTH`].
    fn flatten_if_deep(&self) -> Result<()> {
        let chain = self.chain()?;
        if chain.len() <= FLATTEN_DEPTH || !self.snapshots()?.is_empty() {
            return Ok(());
        }
        let base = chain.last().cloned().expect("a chain has a top");
        tracing::info!(box_id = %self.box_id, depth = chain.len(), "flattening deep disk chain");
        qcow2::flatten(&self.path, Some(&base)).map_err(self.wrap())
    }

    /// Removes this Box's disk file (frozen layers it used stay until [`crate::rootfs::gc`]
    /// finds them unreferenced).
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(io_err("remove", &self.path))
    }
}

/// Writes `target` as a byte copy of `source`'s file (its own writes and its snapshots), over
/// the same backing file: Box folders are siblings, so the relative backing name still holds.
fn copy_own_writes(source: &Path, target: &Path) -> std::result::Result<(), Qcow2Error> {
    let tmp = qcow2::temp_sibling(target);
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |e| Qcow2Error::Io {
            op,
            path,
            source: e,
        }
    };
    let copied = std::fs::copy(source, &tmp)
        .map_err(io("copy", source))
        .and_then(|_| std::fs::hard_link(&tmp, target).map_err(io("publish", target)));
    let _ = std::fs::remove_file(&tmp);
    copied?;
    qcow2::check(target).map(drop)
}

fn unique_suffix() -> String {
    let mut bytes = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    hex::encode(bytes)
}
