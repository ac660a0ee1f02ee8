//! Which disk files nothing uses any more, and how much space disks take (`boxlite image prune`,
//! `boxlite system df`).
//!
//! A base disk (`images/rootfs/<id>.raw`) is in use while its image exists or while any Box
//! disk's backing chain reaches it (a Box outlives the removal of its image); a frozen layer
//! (`boxes/.layers/*.qcow2`) is in use while any Box disk's chain reaches it. Chains are walked
//! with the same checks as everywhere else, so a damaged disk stops the sweep instead of letting
//! it delete something that disk needs.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::home::Home;
use crate::rootfs::base;
use crate::rootfs::disk::{self, BoxDisk, DiskError};

/// Space used by disks, in bytes allocated on the host (what `du` reports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Base disks, shared by all Boxes of an image.
    pub bases: u64,
    /// Frozen layers shared by cloned Boxes.
    pub layers: u64,
    /// Box overlays: what each Box wrote itself.
    pub box_disks: u64,
    /// Named volumes, snapshots included.
    pub volumes: u64,
    /// Files that [`unreferenced`] would offer for removal.
    pub reclaimable: u64,
}

fn allocated(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Base disks and frozen layers that neither a live image (`image_ids`) nor the disk of any
/// Box in `box_ids` needs. Boxes without a disk are skipped; a Box whose chain cannot be
/// walked is an error (nothing is offered then).
pub fn unreferenced(
    home: &Home,
    image_ids: &[&str],
    box_ids: &[&str],
) -> Result<Vec<PathBuf>, DiskError> {
    let mut keep: HashSet<PathBuf> = HashSet::new();
    for id in image_ids {
        if let Ok(p) = base::base_path(home, id) {
            keep.insert(std::fs::canonicalize(&p).unwrap_or(p));
        }
    }
    for id in box_ids {
        let path = disk::disk_path(home, id)?;
        if !path.exists() {
            continue;
        }
        for link in BoxDisk::open(home, id)?.chain()? {
            keep.insert(link.canonical);
        }
    }
    let candidates = files_with_ext(&home.rootfs_dir(), "raw")
        .into_iter()
        .chain(files_with_ext(&disk::layers_dir(home), "qcow2"));
    Ok(candidates
        .filter(|p| {
            let canonical = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            !keep.contains(&canonical)
        })
        .collect())
}

/// Space used by base disks, layers, Box disks and volumes; `reclaimable` as for
/// [`unreferenced`] with the same arguments (0 if that cannot be computed).
pub fn usage(home: &Home, image_ids: &[&str], box_ids: &[&str]) -> DiskUsage {
    let sum = |files: Vec<PathBuf>| files.iter().map(|p| allocated(p)).sum::<u64>();
    let mut usage = DiskUsage {
        bases: sum(files_with_ext(&home.rootfs_dir(), "raw")),
        layers: sum(files_with_ext(&disk::layers_dir(home), "qcow2")),
        ..DiskUsage::default()
    };
    for id in box_ids {
        if let Ok(p) = disk::disk_path(home, id) {
            usage.box_disks += allocated(&p);
        }
    }
    if let Ok(entries) = std::fs::read_dir(home.volumes_dir()) {
        for e in entries.flatten() {
            usage.volumes += sum(files_with_ext(&e.path(), "qcow2"));
        }
    }
    usage.reclaimable = unreferenced(home, image_ids, box_ids).map(sum).unwrap_or(0);
    usage
}
