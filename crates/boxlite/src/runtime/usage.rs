//! Where the home folder's space goes (`boxlite system df`) and removing base disks and frozen
//! layers that nothing needs any more (the disk half of `boxlite image prune`).
//!
//! Sizes are bytes allocated on the host (`du`), not apparent lengths: a Box disk is a thin qcow2
//! overlay and a base disk is a sparse raw file. A file with several hard links is counted once
//! per tree. What is in use follows [`crate::rootfs::gc`]: a base disk while its image exists or
//! a Box disk's backing chain reaches it, a frozen layer while a Box disk's chain reaches it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::info;

use super::record::BoxRecord;
use super::{io_err, Result, Runtime, RuntimeError};
use crate::images::manager::ImageManager;
use crate::rootfs::disk::{self, LAYERS_DIR};
use crate::rootfs::gc;

/// Space used by everything under the home folder, by kind.
#[derive(Debug, Clone, Serialize)]
pub struct SystemUsage {
    pub images: ImagesUsage,
    /// Every Box, oldest first.
    pub boxes: Vec<BoxUsage>,
    /// Frozen disk layers shared by cloned Boxes (`boxes/.layers/`).
    pub shared_layers_bytes: u64,
    pub shared_layers: usize,
    pub volumes: Vec<VolumeUsage>,
    /// Base disks and frozen layers that `image prune` would remove now.
    pub reclaimable_bytes: u64,
    /// Everything above together.
    pub total_bytes: u64,
}

/// Space used by images.
#[derive(Debug, Clone, Serialize)]
pub struct ImagesUsage {
    /// How many images the store knows.
    pub count: usize,
    /// Manifests, configs and compressed layers (`images/blobs/`).
    pub blobs_bytes: u64,
    /// Extracted layers (`images/layers/`).
    pub layers_bytes: u64,
    /// Assembled base disks shared by the Boxes of an image (`images/rootfs/`).
    pub base_disks_bytes: u64,
    pub base_disks: usize,
}

/// Space used by one Box: its own overlay, not the shared base or layers below it.
#[derive(Debug, Clone, Serialize)]
pub struct BoxUsage {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub disk_bytes: u64,
    /// The disk's size as the guest sees it.
    pub disk_virtual_size: Option<u64>,
    /// The Box this one was cloned from.
    pub cloned_from: Option<String>,
}

/// Space used by one named volume (its snapshots included).
#[derive(Debug, Clone, Serialize)]
pub struct VolumeUsage {
    pub name: String,
    pub bytes: u64,
}

impl Runtime {
    /// Measures the home folder (reads only; Boxes may run meanwhile).
    pub fn disk_usage(&self) -> Result<SystemUsage> {
        let home = self.home();
        let image_ids = self.image_ids()?;
        let records = BoxRecord::list(&self.db()?)?;
        let box_ids = self.box_ids_with_disks(&records);

        let images = ImagesUsage {
            count: image_ids.len(),
            blobs_bytes: du(&home.blobs_dir()),
            layers_bytes: du(&home.layers_dir()),
            base_disks_bytes: files(&home.rootfs_dir(), "raw").iter().map(|p| du(p)).sum(),
            base_disks: files(&home.rootfs_dir(), "raw").len(),
        };
        let boxes: Vec<BoxUsage> = records
            .iter()
            .map(|r| {
                let disk = disk::disk_path(home, &r.id).ok();
                BoxUsage {
                    id: r.id.clone(),
                    name: r.name.clone(),
                    image: r.image.clone(),
                    state: r.state.to_string(),
                    disk_bytes: disk.as_deref().map(du).unwrap_or(0),
                    disk_virtual_size: disk
                        .and_then(|_| disk::BoxDisk::open(home, &r.id).ok())
                        .and_then(|d| d.virtual_size().ok()),
                    cloned_from: r.config.cloned_from.clone(),
                }
            })
            .collect();
        let volumes = volumes_usage(&home.volumes_dir());
        let layers = files(&disk::layers_dir(home), "qcow2");
        let shared_layers_bytes = layers.iter().map(|p| du(p)).sum();
        let shared_layers = layers.len();
        let ids: Vec<&str> = image_ids.iter().map(String::as_str).collect();
        let boxes_ids: Vec<&str> = box_ids.iter().map(String::as_str).collect();
        let reclaimable_bytes = gc::usage(home, &ids, &boxes_ids).reclaimable;

        let total_bytes = images.blobs_bytes
            + images.layers_bytes
            + images.base_disks_bytes
            + boxes.iter().map(|b| b.disk_bytes).sum::<u64>()
            + shared_layers_bytes
            + volumes.iter().map(|v| v.bytes).sum::<u64>();
        Ok(SystemUsage {
            images,
            boxes,
            shared_layers_bytes,
            shared_layers,
            volumes,
            reclaimable_bytes,
            total_bytes,
        })
    }

    /// Removes base disks (`images/rootfs/*.raw`) and frozen layers (`boxes/.layers/`) that no
    /// image and no Box disk needs; returns them with the bytes each freed. Call it after images
    /// were removed so their base disks count as unused.
    ///
    /// A Box folder with a disk counts even before its record is written (a `create` or `clone`
    /// in progress). Known shortcoming: a `--rootfs DIR` base disk that a concurrent `create`
    /// has built but not yet put an overlay on can be removed; that create then fails cleanly.
    pub fn prune_disks(&self) -> Result<Vec<(PathBuf, u64)>> {
        let home = self.home();
        let image_ids = self.image_ids()?;
        let records = BoxRecord::list(&self.db()?)?;
        let box_ids = self.box_ids_with_disks(&records);
        let ids: Vec<&str> = image_ids.iter().map(String::as_str).collect();
        let boxes_ids: Vec<&str> = box_ids.iter().map(String::as_str).collect();
        let unused = gc::unreferenced(home, &ids, &boxes_ids).map_err(|e| RuntimeError::Disk {
            name: "(all boxes)".into(),
            message: chain_text(&e),
        })?;
        let mut removed = Vec::new();
        for path in unused {
            let bytes = du(&path);
            std::fs::remove_file(&path)
                .map_err(io_err(format!("cannot remove {}", path.display())))?;
            info!(path = %path.display(), bytes, "removed unused disk");
            removed.push((path, bytes));
        }
        Ok(removed)
    }

    fn image_ids(&self) -> Result<Vec<String>> {
        let images = ImageManager::new(self.home()).map_err(|e| RuntimeError::Image {
            reference: "(store)".into(),
            source: Box::new(e),
        })?;
        let list = images.list().map_err(|e| RuntimeError::Image {
            reference: "(store)".into(),
            source: Box::new(e),
        })?;
        Ok(list.into_iter().map(|r| r.id.to_string()).collect())
    }

    /// Ids of recorded Boxes and of Box folders holding a disk (a create or clone in progress).
    fn box_ids_with_disks(&self, records: &[BoxRecord]) -> Vec<String> {
        let mut ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let seen: HashSet<String> = ids.iter().cloned().collect();
        if let Ok(entries) = std::fs::read_dir(self.home().boxes_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == LAYERS_DIR || name.starts_with('.') || seen.contains(&name) {
                    continue;
                }
                if entry.path().join(disk::DISK_FILE).exists() {
                    ids.push(name);
                }
            }
        }
        ids
    }
}

/// `error: cause: cause`, for errors carried as text.
fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Bytes allocated under `path` (a file or a tree), each inode counted once; symlinks are not
/// followed.
pub fn du(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    du_walk(path, &mut seen)
}

fn du_walk(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = if seen.insert((meta.dev(), meta.ino())) {
        meta.blocks() * 512
    } else {
        0
    };
    if !meta.is_dir() {
        return own;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return own;
    };
    own + entries
        .flatten()
        .map(|e| du_walk(&e.path(), seen))
        .sum::<u64>()
}

/// The files in `dir` whose name ends in `.ext` (hidden and temporary ones left out).
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn volumes_usage(dir: &Path) -> Vec<VolumeUsage> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut volumes: Vec<VolumeUsage> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| VolumeUsage {
            name: e.file_name().to_string_lossy().into_owned(),
            bytes: du(&e.path()),
        })
        .collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    volumes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn du_counts_hard_links_once_and_sparse_files_by_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::write(&data, vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(&data, dir.path().join("link")).unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let total = du(dir.path());
        assert!(total >= 64 * 1024, "{total}");
        assert!(
            total < 256 * 1024,
            "link or sparse file counted in full: {total}"
        );
        assert_eq!(du(&dir.path().join("missing")), 0);
    }
}
