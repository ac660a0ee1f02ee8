//! Careful qcow2 operations on top of `qemu-img`: overlays, checks, growth, internal snapshots
//! and flattening (qcow2 spec, docs/interop/qcow2.txt; `qemu-img(1)`).
//!
//! The rules every function here keeps:
//! - the backing format is always written into an overlay (`-F`), never left to probing;
//! - the backing name is stored relative to the overlay's folder, so a home folder can move;
//! - a backing chain is walked and checked ([`crate::rootfs::chain`]) before QEMU opens it;
//! - an overlay is never created over an existing path, nor over itself (same path, another
//!   spelling, a symlink to it), and a failed creation leaves no file behind;
//! - whole-file rewrites (flatten) happen in a temporary file in the same folder, renamed over
//!   the old one, so a crash leaves the old image or the new one.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::rootfs::chain::{self, ChainError, ChainLink};
use crate::rootfs::qemu_img::{self, CheckReport, ImageFormat, ImageInfo, SnapshotInfo, ToolError};

/// Most characters in a snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 64;

/// A failed qcow2 operation.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// `qemu-img`/`qemu-io` failed on this image.
    #[error("{op} {path}")]
    Tool {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: ToolError,
    },
    /// The backing chain is unsafe to open.
    #[error("refusing to use {path}")]
    Chain {
        path: PathBuf,
        #[source]
        source: ChainError,
    },
    /// An overlay would be its own backing file.
    #[error("refusing to create {path} with itself as backing file (named as {backing})")]
    SelfReference { path: PathBuf, backing: PathBuf },
    /// Something already exists at the path of a new image.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    /// A disk can only grow.
    #[error("{path} is {current} bytes; refusing to shrink it to {requested} bytes")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    /// A snapshot with this name does not exist.
    #[error("{path} has no snapshot named {name:?}")]
    SnapshotNotFound { path: PathBuf, name: String },
    /// A snapshot with this name exists already.
    #[error("{path} already has a snapshot named {name:?}")]
    SnapshotExists { path: PathBuf, name: String },
    /// A snapshot name boxlite does not accept.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidSnapshotName { name: String, reason: &'static str },
    /// An operation that would silently change what internal snapshots contain.
    #[error("{path} has internal snapshots ({names}); {op} would change or drop them")]
    HasSnapshots {
        path: PathBuf,
        op: &'static str,
        names: String,
    },
    /// `qemu-img check` found errors in an image boxlite just wrote.
    #[error("{path} fails `qemu-img check` after {op}: {errors} errors, {corruptions} corruptions, {leaks} leaked clusters")]
    CheckFailed {
        path: PathBuf,
        op: &'static str,
        errors: u64,
        corruptions: u64,
        leaks: u64,
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

type Result<T> = std::result::Result<T, Qcow2Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Qcow2Error + 'a {
    move |source| Qcow2Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn tool_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(ToolError) -> Qcow2Error + 'a {
    move |source| Qcow2Error::Tool {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Walks and checks the chain of `path` (see [`chain::walk`]).
pub fn verify_chain(path: &Path, format: ImageFormat) -> Result<Vec<ChainLink>> {
    chain::walk(path, format).map_err(|source| Qcow2Error::Chain {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates a standalone qcow2 image of `size` bytes (thin: a few hundred KiB on the host).
pub fn create(path: &Path, size: u64) -> Result<()> {
    let size_arg = size.to_string();
    publish_new(path, |tmp| {
        qemu_img::qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            tmp.as_os_str(),
            size_arg.as_ref(),
        ])
        .map(drop)
        .map_err(tool_err("create", path))
    })
}

/// Creates the qcow2 overlay `path` over `backing` (opened as `backing_format`), with virtual
/// size `size` (default: the backing's size; never smaller than it).
///
/// The backing name is stored relative to the overlay's folder and its format is recorded.
/// Refused: an existing `path`, a backing that is `path` itself under any spelling, a backing
/// chain that loops, is too deep or is unsafe to open. On failure nothing is left at `path`.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
    size: Option<u64>,
) -> Result<()> {
    refuse_self_reference(path, backing)?;
    if path.symlink_metadata().is_ok() {
        return Err(Qcow2Error::AlreadyExists {
            path: path.to_path_buf(),
        });
    }

    let forbidden: HashSet<PathBuf> = absolute_lexical(path).into_iter().collect();
    let links = chain::walk_excluding(backing, backing_format, &forbidden).map_err(|source| {
        Qcow2Error::Chain {
            path: backing.to_path_buf(),
            source,
        }
    })?;
    let top = &links[0];
    let backing_size = match top.virtual_size {
        Some(s) => s,
        None => std::fs::metadata(&top.canonical)
            .map_err(io_err("stat", &top.canonical))?
            .len(),
    };
    let size = size.unwrap_or(backing_size);
    if size < backing_size {
        return Err(Qcow2Error::Shrink {
            path: path.to_path_buf(),
            current: backing_size,
            requested: size,
        });
    }

    let parent = canonical_parent(path)?;
    let relative = relative_path(&parent, &top.canonical);
    let size_arg = size.to_string();
    let fmt = backing_format.as_str();
    publish_new(path, |tmp| {
        // -u: the chain was walked above; qemu-img need not open it again.
        qemu_img::qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            fmt.as_ref(),
            "-b".as_ref(),
            relative.as_os_str(),
            "-u".as_ref(),
            tmp.as_os_str(),
            size_arg.as_ref(),
        ])
        .map(drop)
        .map_err(tool_err("create overlay", path))
    })?;
    tracing::debug!(path = %path.display(), backing = %relative.display(), "created overlay");
    Ok(())
}

/// `qemu-img info` of a qcow2 image (backing chain not opened). Works while a VM uses it.
pub fn info(path: &Path) -> Result<ImageInfo> {
    qemu_img::info(path, ImageFormat::Qcow2, true).map_err(tool_err("inspect", path))
}

/// `qemu-img check` of a qcow2 image, after its chain was verified.
pub fn check(path: &Path) -> Result<CheckReport> {
    verify_chain(path, ImageFormat::Qcow2)?;
    qemu_img::check(path).map_err(tool_err("check", path))
}

/// Checks an image before a VM opens it: corruption is refused, leaked clusters (what a crash
/// between allocating a cluster and referencing it leaves: wasted space, no harm to data) are
/// repaired with `qemu-img check -r leaks`. Returns the report after any repair.
pub fn check_and_repair_leaks(path: &Path) -> Result<CheckReport> {
    let report = check(path)?;
    if report.check_errors > 0 || report.corruptions > 0 {
        return Err(Qcow2Error::CheckFailed {
            path: path.to_path_buf(),
            op: "the last use",
            errors: report.check_errors,
            corruptions: report.corruptions,
            leaks: report.leaks,
        });
    }
    if report.leaks == 0 {
        return Ok(report);
    }
    tracing::warn!(path = %path.display(), leaks = report.leaks, "repairing leaked clusters");
    qemu_img::qemu_img(&[
        "check".as_ref(),
        "-q".as_ref(),
        "-r".as_ref(),
        "leaks".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
    ])
    .map_err(tool_err("repair", path))?;
    settle(path, "repairing leaks")?;
    check(path)
}

/// Grows the virtual size of `path` to `size` bytes. Equal is a no-op; smaller is refused.
pub fn grow(path: &Path, size: u64) -> Result<()> {
    verify_chain(path, ImageFormat::Qcow2)?;
    let current = info(path)?.virtual_size;
    if size < current {
        return Err(Qcow2Error::Shrink {
            path: path.to_path_buf(),
            current,
            requested: size,
        });
    }
    if size == current {
        return Ok(());
    }
    let size_arg = size.to_string();
    qemu_img::qemu_img(&[
        "resize".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
        size_arg.as_ref(),
    ])
    .map_err(tool_err("grow", path))?;
    settle(path, "grow")
}

/// Checks a snapshot name: 1..=64 of `[A-Za-z0-9._-]`, not starting with `-` or `.`, and not
/// all digits (`qemu-img snapshot` would take a number for a snapshot *id*).
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Qcow2Error::InvalidSnapshotName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
        return bad("must be 1 to 64 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with(['-', '.']) {
        return bad("must not start with '-' or '.'");
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return bad("must not be all digits (those name snapshot ids)");
    }
    Ok(())
}

/// The internal snapshots of `path`, oldest first.
pub fn snapshots(path: &Path) -> Result<Vec<SnapshotInfo>> {
    Ok(info(path)?.snapshots)
}

fn find_snapshot(path: &Path, name: &str) -> Result<SnapshotInfo> {
    snapshots(path)?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Qcow2Error::SnapshotNotFound {
            path: path.to_path_buf(),
            name: name.to_string(),
        })
}

fn snapshot_op(path: &Path, flag: &str, name: &str, op: &'static str) -> Result<()> {
    verify_chain(path, ImageFormat::Qcow2)?;
    qemu_img::qemu_img(&[
        "snapshot".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        flag.as_ref(),
        name.as_ref(),
        path.as_os_str(),
    ])
    .map_err(tool_err(op, path))?;
    settle(path, op)
}

/// Takes internal snapshot `name` of `path` (the image must not be in use by a VM).
pub fn snapshot_create(path: &Path, name: &str) -> Result<()> {
    validate_snapshot_name(name)?;
    if snapshots(path)?.iter().any(|s| s.name == name) {
        return Err(Qcow2Error::SnapshotExists {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    snapshot_op(path, "-c", name, "create snapshot in")
}

/// Reverts `path` to internal snapshot `name` (the image must not be in use by a VM).
pub fn snapshot_apply(path: &Path, name: &str) -> Result<()> {
    validate_snapshot_name(name)?;
    find_snapshot(path, name)?;
    snapshot_op(path, "-a", name, "revert to snapshot in")
}

/// Deletes internal snapshot `name` of `path` (the image must not be in use by a VM).
pub fn snapshot_delete(path: &Path, name: &str) -> Result<()> {
    validate_snapshot_name(name)?;
    find_snapshot(path, name)?;
    snapshot_op(path, "-d", name, "delete snapshot in")
}

fn refuse_snapshots(path: &Path, op: &'static str) -> Result<()> {
    let snaps = snapshots(path)?;
    if snaps.is_empty() {
        return Ok(());
    }
    Err(Qcow2Error::HasSnapshots {
        path: path.to_path_buf(),
        op,
        names: snaps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Rewrites `path` so that its chain is just `path` over `onto` (which must be in its chain):
/// every layer in between is merged into `path`. With `onto = None` the image becomes
/// standalone. Refused while `path` has internal snapshots (their unallocated clusters read
/// through the chain, so they would change). Atomic: written beside `path`, then renamed.
pub fn flatten(path: &Path, onto: Option<&ChainLink>) -> Result<()> {
    let links = verify_chain(path, ImageFormat::Qcow2)?;
    refuse_snapshots(path, "flattening")?;
    if let Some(onto) = onto {
        if !links.iter().skip(1).any(|l| l.canonical == onto.canonical) {
            return Err(Qcow2Error::Chain {
                path: path.to_path_buf(),
                source: ChainError::BadHeader {
                    path: onto.canonical.clone(),
                    reason: "not in the backing chain of the image being flattened".into(),
                },
            });
        }
    }
    let parent = canonical_parent(path)?;
    let tmp = temp_sibling(path);
    let _cleanup = RemoveOnDrop(tmp.clone());

    match onto {
        Some(onto) => {
            // Safe-mode rebase of a copy: every cluster that reads differently through the new
            // backing file is copied into the image first. (`convert -B` would copy only the
            // top image's own clusters and lose the layers in between.)
            std::fs::copy(path, &tmp).map_err(io_err("copy", path))?;
            let relative = relative_path(&parent, &onto.canonical);
            qemu_img::qemu_img(&[
                "rebase".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                onto.format.as_str().as_ref(),
                "-b".as_ref(),
                relative.as_os_str(),
                tmp.as_os_str(),
            ])
            .map_err(tool_err("flatten", path))?;
        }
        None => {
            qemu_img::qemu_img(&[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
                tmp.as_os_str(),
            ])
            .map_err(tool_err("flatten", path))?;
        }
    }
    settle(&tmp, "flatten")?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err("replace", path))?;
    sync_dir(&parent);
    Ok(())
}

/// Verifies an image boxlite just wrote with `qemu-img check`, and extends the file (sparsely)
/// to the end of its last cluster: `qemu-img` leaves the last metadata cluster partly unwritten,
/// and a file that ends before the image end offset it reports confuses tools that trust it.
fn settle(path: &Path, op: &'static str) -> Result<()> {
    let report = qemu_img::check(path).map_err(tool_err("check", path))?;
    if !report.is_clean() {
        return Err(Qcow2Error::CheckFailed {
            path: path.to_path_buf(),
            op,
            errors: report.check_errors,
            corruptions: report.corruptions,
            leaks: report.leaks,
        });
    }
    if let Some(end) = report.image_end_offset {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        if len < end {
            file.set_len(end).map_err(io_err("extend", path))?;
        }
    }
    Ok(())
}

/// Creates a new image at `path` through `make(tmp)`, which writes a temporary file in the same
/// folder; the file then appears at `path` atomically, never replacing anything there.
fn publish_new(path: &Path, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let _cleanup = RemoveOnDrop(tmp.clone());
    make(&tmp)?;
    settle(&tmp, "create")?;
    sync_file(&tmp)?;
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Qcow2Error::AlreadyExists {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("publish", path)(e)),
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Removes a temporary file when dropped (no-op once it was renamed away).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh temporary name in the folder of `path`, so a rename out of it is atomic.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn canonical_parent(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&parent).map_err(io_err("resolve folder of", path))
}

/// `path` made absolute with its folder canonicalized and its file name kept (it need not exist).
fn absolute_lexical(path: &Path) -> Option<PathBuf> {
    let parent = canonical_parent(path).ok()?;
    Some(parent.join(path.file_name()?))
}

/// Refuses `backing` when it names `path`: the same spelling, another spelling of the same
/// location, or a chain of symlinks ending there (checked without needing `path` to exist).
fn refuse_self_reference(path: &Path, backing: &Path) -> Result<()> {
    let target = absolute_lexical(path);
    let refuse = || Qcow2Error::SelfReference {
        path: path.to_path_buf(),
        backing: backing.to_path_buf(),
    };
    let mut hop = backing.to_path_buf();
    for _ in 0..40 {
        let here = absolute_lexical(&hop);
        if here.is_some() && here == target {
            return Err(refuse());
        }
        match std::fs::read_link(&hop) {
            Ok(next) => hop = chain::resolve_backing(&hop, &next.to_string_lossy()),
            Err(_) => break,
        }
    }
    match (std::fs::canonicalize(backing), std::fs::canonicalize(path)) {
        (Ok(a), Ok(b)) if a == b => Err(refuse()),
        _ => Ok(()),
    }
}

/// The relative path from folder `from` to `to`; both absolute and canonical.
pub(crate) fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for part in &to_parts[common..] {
        rel.push(part.as_os_str());
    }
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_between_folders() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_path(&p("/h/boxes/b1"), &p("/h/images/rootfs/x.raw")),
            p("../../images/rootfs/x.raw")
        );
        assert_eq!(relative_path(&p("/h/v"), &p("/h/v/a.qcow2")), p("a.qcow2"));
    }

    #[test]
    fn snapshot_names() {
        for ok in ["s1", "before-upgrade", "v1.2_x"] {
            assert!(validate_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "12", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
