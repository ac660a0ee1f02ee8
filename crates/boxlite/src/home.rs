//! The home folder: where boxlite keeps everything it owns (`BOXLITE_HOME`, default `~/.boxlite`).
//!
//! ```text
//! db/boxlite.db                   state
//! images/blobs/sha256/<hex>       manifests, configs and compressed layers, by digest
//! images/layers/<diff_id hex>/    one extracted layer, shared across images
//! images/rootfs/<id>.<fmt>        assembled read-only base image, shared across Boxes
//! boxes/<box id>/                 disk.qcow2 (overlay), sockets, console.log, shim log
//! volumes/<name>/                 volume.qcow2 and its snapshots
//! tmp/                            staging, same filesystem as the rest
//! ```

use std::io;
use std::path::{Path, PathBuf};

/// The layout of one home folder. Cheap to clone; creating it makes the folders.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home folder named by `BOXLITE_HOME`, else `~/.boxlite`.
    pub fn from_env() -> io::Result<Home> {
        let root = match std::env::var_os("BOXLITE_HOME") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "neither BOXLITE_HOME nor HOME is set",
                    )
                })?;
                PathBuf::from(home).join(".boxlite")
            }
        };
        Home::open(root)
    }

    /// Opens (creating if needed) the home folder at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Home> {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()?.join(root)
        };
        let home = Home { root };
        for dir in [
            home.db_dir(),
            home.blobs_dir(),
            home.layers_dir(),
            home.rootfs_dir(),
            home.boxes_dir(),
            home.volumes_dir(),
            home.tmp_dir(),
        ] {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(home)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn db_dir(&self) -> PathBuf {
        self.root.join("db")
    }
    pub fn db_path(&self) -> PathBuf {
        self.db_dir().join("boxlite.db")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// `images/blobs/sha256`: blobs by the hex of their sha256 digest.
    pub fn blobs_dir(&self) -> PathBuf {
        self.images_dir().join("blobs").join("sha256")
    }
    pub fn layers_dir(&self) -> PathBuf {
        self.images_dir().join("layers")
    }
    pub fn rootfs_dir(&self) -> PathBuf {
        self.images_dir().join("rootfs")
    }
    pub fn boxes_dir(&self) -> PathBuf {
        self.root.join("boxes")
    }
    pub fn box_dir(&self, box_id: &str) -> PathBuf {
        self.boxes_dir().join(box_id)
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(name)
    }
    /// Staging area on the same filesystem as everything else, so renames out of it are atomic.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// Config file for registries (mirrors, insecure registries) and limits.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }
}
