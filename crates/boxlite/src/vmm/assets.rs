//! Finds the guest kernel (`vmlinux`, Debian's, uncompressed) and the initramfs (guest agent plus
//! kernel modules) that `scripts/build-assets.sh` produces.
//!
//! Lookup order: `$BOXLITE_ASSETS`, then `assets/` next to the running executable and up to three
//! folders above it (which covers `target/debug/boxlite` and `target/debug/deps/<test>` finding
//! `target/assets`).

use std::path::{Path, PathBuf};

use super::VmmError;

/// The files one guest boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestAssets {
    /// The assets in `dir` (`vmlinux` and `initramfs.img`).
    pub fn in_dir(dir: &Path) -> Result<GuestAssets, VmmError> {
        let assets = GuestAssets {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.img"),
        };
        for file in [&assets.kernel, &assets.initrd] {
            if !file.is_file() {
                return Err(VmmError::AssetsMissing(file.display().to_string()));
            }
        }
        Ok(assets)
    }

    /// Finds the assets as described in the module docs.
    pub fn locate() -> Result<GuestAssets, VmmError> {
        if let Some(dir) = std::env::var_os("BOXLITE_ASSETS").filter(|d| !d.is_empty()) {
            return GuestAssets::in_dir(Path::new(&dir));
        }
        let exe = std::env::current_exe().map_err(|e| VmmError::Io {
            context: "cannot find the running executable".into(),
            source: e,
        })?;
        let mut tried = Vec::new();
        let mut dir = exe.parent();
        for _ in 0..4 {
            let Some(d) = dir else { break };
            let candidate = d.join("assets");
            if let Ok(found) = GuestAssets::in_dir(&candidate) {
                return Ok(found);
            }
            tried.push(candidate.display().to_string());
            dir = d.parent();
        }
        Err(VmmError::AssetsMissing(format!(
            "looked in {}",
            tried.join(", ")
        )))
    }
}
