//! Building an image's root filesystem from its cached layers, in order, with the OCI image
//! spec's change rules ("Applying Changesets"): whiteouts delete what lower layers put at a path,
//! an opaque directory hides all of its lower content, anything else adds or replaces.
//!
//! Two modes. [`AssembleMode::Link`] hardlinks regular files from the cache (fast; the result is
//! read by the base-image builder and never written): a cache inode is only ever linked, never
//! chmod-ed or written through; a replaced name is unlinked first. [`AssembleMode::Copy`] copies
//! everything, for a tree the user owns (`boxlite image unpack`). A linked tree shares its
//! inodes, setuid binaries included, with the cache: keep it where only its owner can reach it
//! (the cache itself is mode 0700), and never write into it.
//!
//! The destination is shaped by hostile layers too, so every step acts on one name inside an
//! open directory without following it. Two things do follow symlinks, always inside the root
//! (`openat2(RESOLVE_IN_ROOT)`), as containerd does: a directory a layer did not declare (it
//! only holds the layer's content) merges into what a lower layer's symlink points at (merged
//! `/usr` images: a layer adding `lib/x` on top of `lib -> usr/lib`), and a hardlink into a lower
//! layer finds its target. A directory the layer declares replaces a lower symlink.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sys::stat::{FileStat, SFlag};

use crate::images::digest::DiffId;
use crate::images::layer::fsops::{self, Attrs, Shortfall};
use crate::images::layer::{LayerMeta, RelPath};
use crate::images::storage::{ImageStorage, StorageError};

/// How regular files get into the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssembleMode {
    /// Hardlink from the layer cache (destination on the same filesystem, read only).
    Link,
    /// Copy everything (a tree someone may modify).
    Copy,
}

/// What assembly did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssembleStats {
    pub layers: usize,
    pub files_linked: u64,
    pub files_copied: u64,
    pub hardlinks: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub special_files: u64,
    pub whiteouts: u64,
    /// Files copied in `Link` mode because linking was impossible (another filesystem).
    pub link_fallbacks: u64,
    /// Attributes that could not be applied (unprivileged): inode count.
    pub attr_shortfalls: u64,
}

/// Why assembly failed. The destination is emptied (or removed, if assembly created it).
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("cannot assemble into {path}: {reason}")]
    Destination { path: PathBuf, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("layer {diff_id}: {path}: {reason}")]
    Conflict {
        diff_id: DiffId,
        path: String,
        reason: String,
    },
    #[error("layer {diff_id}: cannot {op} {path}")]
    Io {
        diff_id: DiffId,
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Assembles `layers` (bottom first) from `storage` into `dest`, which must be missing or an
/// empty directory. On error the destination is left as it was found (missing or empty).
pub fn assemble(
    storage: &ImageStorage,
    layers: &[DiffId],
    dest: &Path,
    mode: AssembleMode,
) -> Result<AssembleStats, AssembleError> {
    let dest_err = |reason: String| AssembleError::Destination {
        path: dest.to_path_buf(),
        reason,
    };
    let created = match std::fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => {
            let fd = fsops::open_dir(dest).map_err(|e| dest_err(e.to_string()))?;
            if !fsops::list_dir(fd.as_fd())
                .map_err(|e| dest_err(e.to_string()))?
                .is_empty()
            {
                return Err(dest_err("it is not empty".into()));
            }
            false
        }
        Ok(_) => return Err(dest_err("it is not a directory".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(|e| dest_err(e.to_string()))?;
            true
        }
        Err(e) => return Err(dest_err(e.to_string())),
    };

    let result = assemble_into(storage, layers, dest, mode);
    if result.is_err() {
        let cleanup = if created {
            fsops::remove_tree(dest)
        } else {
            fsops::open_dir(dest).and_then(|fd| fsops::clear_dir(fd.as_fd()))
        };
        if let Err(e) = cleanup {
            tracing::warn!(path = %dest.display(), error = %e, "cannot clean up after failed assembly");
        }
    }
    result
}

fn assemble_into(
    storage: &ImageStorage,
    layers: &[DiffId],
    dest: &Path,
    mode: AssembleMode,
) -> Result<AssembleStats, AssembleError> {
    let dest_err = |e: io::Error| AssembleError::Destination {
        path: dest.to_path_buf(),
        reason: e.to_string(),
    };
    let dest_canon = dest.canonicalize().map_err(dest_err)?;
    let dest_root = fsops::open_dir(&dest_canon).map_err(dest_err)?;
    let mut stats = AssembleStats::default();
    for diff_id in layers {
        let meta = storage.read_meta(diff_id)?;
        let src_root_path = storage.layer_root(diff_id);
        let src_root = fsops::open_dir(&src_root_path).map_err(|source| AssembleError::Io {
            diff_id: diff_id.clone(),
            op: "open",
            path: src_root_path.display().to_string(),
            source,
        })?;
        let mut apply = LayerApply::new(
            diff_id,
            &meta,
            mode,
            dest_root.as_fd(),
            &dest_canon,
            &mut stats,
        );
        let root = RelPath::root();
        let io_root = |source| AssembleError::Io {
            diff_id: diff_id.clone(),
            op: "update",
            path: dest.display().to_string(),
            source,
        };
        let kept_times = fsops::times(dest_root.as_fd()).map_err(io_root)?;
        apply.dir(&root, src_root.as_fd(), dest_root.as_fd(), Path::new(""))?;
        if meta.implicit_dirs.contains(&root) {
            fsops::set_times(dest_root.as_fd(), kept_times).map_err(io_root)?;
        } else {
            apply.copy_dir_attrs(src_root.as_fd(), dest_root.as_fd(), &root)?;
        }
        stats.layers += 1;
        tracing::debug!(%diff_id, "layer applied");
    }
    Ok(stats)
}

// Public types cross threads.
const _: () = {
    fn check<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn all() {
        check::<AssembleMode>();
        check::<AssembleStats>();
        check::<AssembleError>();
    }
};

/// Applying one layer onto the destination.
struct LayerApply<'a> {
    diff_id: &'a DiffId,
    meta: &'a LayerMeta,
    mode: AssembleMode,
    dest_root: BorrowedFd<'a>,
    dest_canon: &'a Path,
    stats: &'a mut AssembleStats,
    whiteouts: BTreeMap<RelPath, Vec<OsString>>,
    external: BTreeMap<RelPath, Vec<(OsString, &'a RelPath)>>,
    devices: BTreeMap<RelPath, Vec<(OsString, &'a crate::images::layer::DeviceNode)>>,
    /// Copy mode: cache inode to the first destination name made for it (real parent path
    /// relative to the root, name), so hardlink groups stay groups.
    copied: HashMap<(u64, u64), (PathBuf, OsString)>,
}

fn by_parent<'m, V>(
    items: impl Iterator<Item = (&'m RelPath, V)>,
) -> BTreeMap<RelPath, Vec<(OsString, V)>> {
    let mut out: BTreeMap<RelPath, Vec<(OsString, V)>> = BTreeMap::new();
    for (path, v) in items {
        if let Some((parent, name)) = path.split_last() {
            out.entry(parent)
                .or_default()
                .push((name.to_os_string(), v));
        }
    }
    out
}

impl<'a> LayerApply<'a> {
    fn new(
        diff_id: &'a DiffId,
        meta: &'a LayerMeta,
        mode: AssembleMode,
        dest_root: BorrowedFd<'a>,
        dest_canon: &'a Path,
        stats: &'a mut AssembleStats,
    ) -> LayerApply<'a> {
        let whiteouts = by_parent(meta.whiteouts.iter().map(|p| (p, ())))
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|(n, ())| n).collect()))
            .collect();
        LayerApply {
            diff_id,
            meta,
            mode,
            dest_root,
            dest_canon,
            stats,
            whiteouts,
            external: by_parent(meta.external_hardlinks.iter()),
            devices: if fsops::euid_is_root() {
                by_parent(meta.skipped_devices.iter())
            } else {
                BTreeMap::new()
            },
            copied: HashMap::new(),
        }
    }

    fn io(&self, op: &'static str, path: &RelPath) -> impl FnOnce(io::Error) -> AssembleError {
        let diff_id = self.diff_id.clone();
        let path = path.to_string();
        move |source| AssembleError::Io {
            diff_id,
            op,
            path,
            source,
        }
    }

    fn conflict(&self, path: &RelPath, reason: String) -> AssembleError {
        AssembleError::Conflict {
            diff_id: self.diff_id.clone(),
            path: path.to_string(),
            reason,
        }
    }

    /// Applies the layer directory `rel` (open as `src`) onto `dest`, whose real path relative
    /// to the root is `dest_real`.
    fn dir(
        &mut self,
        rel: &RelPath,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        dest_real: &Path,
    ) -> Result<(), AssembleError> {
        // Lower content goes first: the opaque marker, then whiteouts.
        if self.meta.opaque_dirs.contains(rel) {
            fsops::clear_dir(dest).map_err(self.io("clear opaque directory", rel))?;
        }
        if let Some(names) = self.whiteouts.get(rel) {
            for name in names.clone() {
                let path = rel.join(&name);
                if fsops::lstat_at(dest, &name)
                    .map_err(self.io("inspect", &path))?
                    .is_some()
                {
                    fsops::remove_at(dest, &name).map_err(self.io("remove whited-out", &path))?;
                    self.stats.whiteouts += 1;
                }
            }
        }

        let names = fsops::list_dir(src).map_err(self.io("list", rel))?;
        for name in names {
            let path = rel.join(&name);
            let st = fsops::lstat_at(src, &name)
                .map_err(self.io("inspect", &path))?
                .ok_or_else(|| self.conflict(&path, "vanished from the layer cache".into()))?;
            match fsops::file_type(&st) {
                SFlag::S_IFDIR => self.child_dir(&path, src, dest, dest_real, &name)?,
                SFlag::S_IFREG => self.file(&path, src, &st, dest, dest_real, &name)?,
                SFlag::S_IFLNK => {
                    self.clear_name(dest, &name, &path)?;
                    let target =
                        fsops::readlink_at(src, &name).map_err(self.io("read symlink", &path))?;
                    fsops::symlink_at(&target, dest, &name)
                        .map_err(self.io("create symlink", &path))?;
                    let attrs = fsops::read_attrs_at(src, &name, &st)
                        .map_err(self.io("read attributes of", &path))?;
                    self.apply_at(dest, &name, true, &attrs, &path)?;
                    self.stats.symlinks += 1;
                }
                kind => {
                    self.clear_name(dest, &name, &path)?;
                    fsops::mknod_at(dest, &name, kind, st.st_rdev)
                        .map_err(self.io("create node", &path))?;
                    let attrs = fsops::read_attrs_at(src, &name, &st)
                        .map_err(self.io("read attributes of", &path))?;
                    self.apply_at(dest, &name, false, &attrs, &path)?;
                    self.stats.special_files += 1;
                }
            }
        }

        if let Some(devices) = self.devices.get(rel).cloned() {
            for (name, dev) in devices {
                let path = rel.join(&name);
                self.clear_name(dest, &name, &path)?;
                let kind = if dev.kind == 'b' {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                let rdev = nix::sys::stat::makedev(u64::from(dev.major), u64::from(dev.minor));
                fsops::mknod_at(dest, &name, kind, rdev).map_err(self.io("create node", &path))?;
                let attrs = Attrs {
                    mode: dev.mode,
                    uid: dev.uid,
                    gid: dev.gid,
                    mtime: dev.mtime,
                    xattrs: Vec::new(),
                };
                self.apply_at(dest, &name, false, &attrs, &path)?;
                self.stats.special_files += 1;
            }
        }
        // Hardlinks into lower layers last: their targets may be the nodes above. (A target
        // this layer replaces resolves to the new file, although a tar read in order would link
        // the old one when the link comes first; no known builder writes that.)
        if let Some(links) = self.external.get(rel).cloned() {
            for (name, target) in links {
                self.external_link(&rel.join(&name), dest, &name, target)?;
            }
        }
        Ok(())
    }

    /// A directory of the layer: find or make its destination, recurse, then (when the layer
    /// declared it) give it the layer's attributes.
    fn child_dir(
        &mut self,
        path: &RelPath,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        dest_real: &Path,
        name: &OsString,
    ) -> Result<(), AssembleError> {
        // A directory the layer did not declare keeps what the lower layers gave it (and may
        // be a lower symlink to follow inside the root); a declared one gets the layer's
        // attributes; an opaque one is always a real directory.
        let declared = !self.meta.implicit_dirs.contains(path);
        let follow = !declared && !self.meta.opaque_dirs.contains(path);
        let markers_only = self.meta.marker_dirs.contains(path);
        let existing = fsops::lstat_at(dest, name).map_err(self.io("inspect", path))?;
        let kind = existing.as_ref().map(fsops::file_type);

        let (dest_dir, real) = match kind {
            Some(SFlag::S_IFDIR) => (
                fsops::open_dir_at(dest, name).map_err(self.io("open", path))?,
                dest_real.join(name),
            ),
            Some(SFlag::S_IFLNK) if follow => {
                match fsops::open_in_root(self.dest_root, &dest_real.join(name)) {
                    Ok(fd) => {
                        let real = self.real_path(fd.as_fd(), path)?;
                        (fd, real)
                    }
                    Err(_) if markers_only => return Ok(()),
                    Err(e) => {
                        return Err(self.conflict(
                            path,
                            format!(
                                "the layer puts files below it, but a lower layer made it a \
                                 symlink that does not lead to a directory inside the image ({e})"
                            ),
                        ))
                    }
                }
            }
            _ if markers_only => return Ok(()),
            _ => {
                if existing.is_some() {
                    fsops::remove_at(dest, name).map_err(self.io("replace", path))?;
                }
                fsops::mkdir_at(dest, name, 0o700).map_err(self.io("create directory", path))?;
                let fd = fsops::open_dir_at(dest, name).map_err(self.io("open", path))?;
                if !declared {
                    fsops::set_mode(fd.as_fd(), 0o755).map_err(self.io("set mode of", path))?;
                }
                self.stats.dirs += 1;
                (fd, dest_real.join(name))
            }
        };
        let kept_times = match (declared, kind) {
            (false, Some(SFlag::S_IFDIR | SFlag::S_IFLNK)) => {
                Some(fsops::times(dest_dir.as_fd()).map_err(self.io("inspect", path))?)
            }
            _ => None,
        };
        let src_dir = fsops::open_dir_at(src, name).map_err(self.io("open", path))?;
        self.dir(path, src_dir.as_fd(), dest_dir.as_fd(), &real)?;
        if declared {
            self.copy_dir_attrs_of(src, name, dest_dir.as_fd(), path)?;
        } else if let Some(times) = kept_times {
            fsops::set_times(dest_dir.as_fd(), times).map_err(self.io("restore times of", path))?;
        }
        Ok(())
    }

    fn copy_dir_attrs_of(
        &mut self,
        src_parent: BorrowedFd<'_>,
        name: &OsString,
        dest_dir: BorrowedFd<'_>,
        path: &RelPath,
    ) -> Result<(), AssembleError> {
        let st = fsops::lstat_at(src_parent, name)
            .map_err(self.io("inspect", path))?
            .ok_or_else(|| self.conflict(path, "vanished from the layer cache".into()))?;
        let attrs = fsops::read_attrs_at(src_parent, name, &st)
            .map_err(self.io("read attributes of", path))?;
        fsops::drop_unlisted_xattrs(dest_dir, &attrs).map_err(self.io("update", path))?;
        self.apply_fd(dest_dir, &attrs, path)
    }

    /// The layer root's own attributes (it declared `./`).
    fn copy_dir_attrs(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        path: &RelPath,
    ) -> Result<(), AssembleError> {
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&src))
            .map_err(|e| self.io("inspect", path)(fsops::errno_io(e)))?;
        let attrs = fsops::read_attrs_at(src, std::ffi::OsStr::new("."), &st)
            .map_err(self.io("read attributes of", path))?;
        fsops::drop_unlisted_xattrs(dest, &attrs).map_err(self.io("update", path))?;
        self.apply_fd(dest, &attrs, path)
    }

    fn file(
        &mut self,
        path: &RelPath,
        src: BorrowedFd<'_>,
        st: &FileStat,
        dest: BorrowedFd<'_>,
        dest_real: &Path,
        name: &OsString,
    ) -> Result<(), AssembleError> {
        self.clear_name(dest, name, path)?;
        if self.mode == AssembleMode::Link {
            match fsops::link_at(src, name, dest, name) {
                Ok(()) => {
                    self.stats.files_linked += 1;
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EPERM | libc::EMLINK)
                    ) =>
                {
                    tracing::debug!(path = %path, error = %e, "cannot link from the layer cache; copying");
                    self.stats.link_fallbacks += 1;
                }
                Err(e) => return Err(self.io("link", path)(e)),
            }
        }

        let key = (st.st_dev, st.st_ino);
        if let Some((first_parent, first_name)) = self.copied.get(&key).cloned() {
            let parent = fsops::open_in_root(self.dest_root, &first_parent)
                .map_err(self.io("open", path))?;
            fsops::link_at(parent.as_fd(), &first_name, dest, name)
                .map_err(self.io("link", path))?;
            self.stats.hardlinks += 1;
            return Ok(());
        }
        let from = fsops::open_file_at(src, name).map_err(self.io("open", path))?;
        let to = fsops::create_file_at(dest, name).map_err(self.io("create", path))?;
        fsops::copy_sparse(&from, &to).map_err(self.io("copy", path))?;
        let attrs =
            fsops::read_attrs_at(src, name, st).map_err(self.io("read attributes of", path))?;
        self.apply_fd(to.as_fd(), &attrs, path)?;
        self.stats.files_copied += 1;
        if st.st_nlink > 1 {
            self.copied
                .insert(key, (dest_real.to_path_buf(), name.clone()));
        }
        Ok(())
    }

    /// A hardlink whose target is in a lower layer: found in the assembled tree.
    fn external_link(
        &mut self,
        path: &RelPath,
        dest: BorrowedFd<'_>,
        name: &OsString,
        target: &RelPath,
    ) -> Result<(), AssembleError> {
        let missing = |why: String| self.conflict(path, format!("hardlink target {target} {why}"));
        let (tparent, tname) = target
            .split_last()
            .expect("hardlink targets are not the root");
        let tdir = match fsops::open_in_root(self.dest_root, tparent.as_path()) {
            Ok(fd) => fd,
            Err(e) => return Err(missing(format!("is not in the layers below ({e})"))),
        };
        match fsops::lstat_at(tdir.as_fd(), tname).map_err(self.io("inspect", target))? {
            None => return Err(missing("is not in the layers below".into())),
            Some(st) if fsops::is_dir(&st) => return Err(missing("is a directory".into())),
            Some(_) => {}
        }
        self.clear_name(dest, name, path)?;
        fsops::link_at(tdir.as_fd(), tname, dest, name).map_err(self.io("link", path))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    /// Removes whatever the lower layers have at `name` (a file never becomes a directory in
    /// place, and a linked cache inode is never written through).
    fn clear_name(
        &self,
        dest: BorrowedFd<'_>,
        name: &OsString,
        path: &RelPath,
    ) -> Result<(), AssembleError> {
        fsops::remove_at(dest, name).map_err(self.io("replace", path))
    }

    fn real_path(&self, fd: BorrowedFd<'_>, path: &RelPath) -> Result<PathBuf, AssembleError> {
        let full = fsops::fd_path(fd).map_err(self.io("locate", path))?;
        full.strip_prefix(self.dest_canon)
            .map(Path::to_path_buf)
            .map_err(|_| self.conflict(path, "resolves outside the destination".into()))
    }

    fn apply_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        attrs: &Attrs,
        path: &RelPath,
    ) -> Result<(), AssembleError> {
        let mut short = Shortfall::default();
        fsops::apply_attrs_fd(fd, attrs, &mut short).map_err(self.io("set attributes of", path))?;
        self.note(short, path);
        Ok(())
    }

    fn apply_at(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsString,
        is_symlink: bool,
        attrs: &Attrs,
        path: &RelPath,
    ) -> Result<(), AssembleError> {
        let mut short = Shortfall::default();
        fsops::apply_attrs_at(dir, name, is_symlink, attrs, &mut short)
            .map_err(self.io("set attributes of", path))?;
        self.note(short, path);
        Ok(())
    }

    fn note(&mut self, short: Shortfall, path: &RelPath) {
        if short.chown_failed || !short.xattrs_failed.is_empty() {
            self.stats.attr_shortfalls += 1;
            for (name, _, reason) in short.xattrs_failed {
                tracing::warn!(path = %path, xattr = %name.to_string_lossy(), %reason, "extended attribute not applied");
            }
        }
    }
}
