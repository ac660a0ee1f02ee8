//! From an image reference (or a host directory) to what a new Box boots from: the image's
//! run defaults and the shared, read-only base disk, built once per image.

use std::path::{Path, PathBuf};

use tracing::info;

use super::config::{BoxOptions, ImageDefaults, RootfsSource};
use super::{Result, RuntimeError};
use crate::home::Home;
use crate::images::assemble::AssembleMode;
use crate::images::manager::{ImageError, ImageManager, ImageRecord};
use crate::images::pull::PullOptions;
use crate::images::reference::Reference;
use crate::rootfs::base::{self, BaseDisk};

/// What a Box is created from.
pub struct ResolvedRootfs {
    pub source: RootfsSource,
    pub defaults: ImageDefaults,
    pub base: BaseDisk,
}

fn image_err(reference: &str) -> impl FnOnce(ImageError) -> RuntimeError + '_ {
    move |e| RuntimeError::Image {
        reference: reference.to_string(),
        source: Box::new(e),
    }
}

/// Resolves `opts` to a base disk: a host directory (`rootfs_dir`) or an image, pulled first when
/// it is not in the store (as `docker run` does).
pub fn resolve(home: &Home, opts: &BoxOptions) -> Result<ResolvedRootfs> {
    if let Some(dir) = &opts.rootfs_dir {
        return from_dir(home, Path::new(dir));
    }
    let reference = opts.image.as_str();
    let images = ImageManager::new(home).map_err(image_err(reference))?;
    let record = match images.get(reference) {
        Ok(record) => record,
        Err(ImageError::NotFound(_)) => {
            info!(reference, "image not in the store: pulling");
            images
                .pull(reference, &PullOptions::default())
                .map_err(image_err(reference))?
        }
        Err(e) => return Err(image_err(reference)(e)),
    };
    let base = ensure_image_base(home, &images, &record).map_err(|e| RuntimeError::Image {
        reference: reference.to_string(),
        source: e,
    })?;
    let config = &record.config;
    let defaults = ImageDefaults {
        env: config.env.clone().unwrap_or_default(),
        entrypoint: config.entrypoint.clone().unwrap_or_default(),
        cmd: config.cmd.clone().unwrap_or_default(),
        working_dir: config.working_dir.clone().unwrap_or_default(),
        user: config.user.clone().unwrap_or_default(),
    };
    let source = RootfsSource::Image {
        reference: recorded_reference(reference, &record),
        image_id: record.id.to_string(),
    };
    Ok(ResolvedRootfs {
        source,
        defaults,
        base,
    })
}

/// The name a Box records for its image: what the user typed, normalised, when it names the
/// image (a tag or a repo digest); for an id, the image's first reference (or the id typed).
fn recorded_reference(typed: &str, record: &ImageRecord) -> String {
    let normalised = typed.parse::<Reference>().ok().map(|r| r.to_string());
    if let Some(name) = normalised.filter(|n| {
        record.references.contains(n) || record.repo_digest.as_deref() == Some(n.as_str())
    }) {
        return name;
    }
    record
        .references
        .first()
        .cloned()
        .unwrap_or_else(|| typed.to_string())
}

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// The image's base disk, assembled (hard links from the layer cache into a staging tree on the
/// same filesystem) and built the first time any Box needs it.
fn ensure_image_base(
    home: &Home,
    images: &ImageManager,
    record: &ImageRecord,
) -> std::result::Result<BaseDisk, BoxedError> {
    let id = record.id.to_string();
    if let Some(existing) = base::existing_base(home, &id)? {
        return Ok(existing);
    }
    let staging = StagingDir::new(home, record.id.hex())?;
    images.assemble_rootfs(record, &staging.0, AssembleMode::Link)?;
    let built = base::ensure_base(home, &id, &staging.0)?;
    info!(image = %id, path = %built.path.display(), size = built.size, "base disk ready");
    Ok(built)
}

/// A host directory as the rootfs (`--rootfs DIR`). Known shortcoming: its base disk is built
/// once per directory path and not rebuilt when the directory changes later.
fn from_dir(home: &Home, dir: &Path) -> Result<ResolvedRootfs> {
    let dir = std::fs::canonicalize(dir)
        .map_err(super::io_err(format!("rootfs directory {}", dir.display())))?;
    let key = format!(
        "dir-{}",
        &crate::images::digest::Digest::of(dir.as_os_str().as_encoded_bytes()).hex()[..16]
    );
    let base = base::ensure_base(home, &key, &dir).map_err(|e| RuntimeError::Image {
        reference: dir.display().to_string(),
        source: Box::new(e),
    })?;
    Ok(ResolvedRootfs {
        source: RootfsSource::Dir {
            path: dir.display().to_string(),
        },
        defaults: ImageDefaults {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        },
        base,
    })
}

/// A folder under the home's `tmp/`, removed when dropped.
struct StagingDir(PathBuf);

impl StagingDir {
    fn new(home: &Home, name: &str) -> std::io::Result<StagingDir> {
        let path = home
            .tmp_dir()
            .join(format!("rootfs-{name}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        Ok(StagingDir(path))
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
