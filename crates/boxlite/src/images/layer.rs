//! Extracting one layer tar into a directory of its own, safely (OCI image spec v1.1, "Image
//! Layer Filesystem Changeset").
//!
//! A layer is hostile input. Every member name is cleaned ([`RelPath`]); `..` is refused; every
//! parent directory is opened one component at a time with `O_NOFOLLOW`, so a symlink planted
//! earlier (in this layer or, at assembly, a lower one) is never written through; a member that
//! replaces a path unlinks the old name first, so a hardlinked inode is never written through;
//! hardlink targets resolve inside the layer's root (absolute ones too) and may not climb out.
//!
//! Each layer is extracted alone into the layer cache, not on top of the layers below it, so
//! the changes that concern lower layers are not files but records in [`LayerMeta`]: whiteouts
//! (`.wh.NAME`), opaque directories (`.wh..wh..opq`, wherever in the tar it appears), and
//! hardlinks whose target lives in a lower layer. [`crate::images::assemble`] applies them.
//!
//! Ownership, xattrs (pax `SCHILY.xattr.*`, `security.capability` included) and modes are set
//! in the order the kernel needs: content, owner, xattrs, mode (setuid and friends survive only
//! a chmod after chown), times. Directory modes and times are set after their content. Device
//! nodes need privilege; without it they are recorded and skipped with a warning, as are xattrs
//! the filesystem or our privileges refuse.

pub(crate) mod fsops;
pub mod meta;
pub mod path;
pub mod tar;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::sys::stat::SFlag;

use fsops::{
    apply_attrs_at, apply_attrs_fd, create_file_at, file_type, is_dir, link_at, list_dir, lstat_at,
    mkdir_at, mknod_at, open_dir, open_dir_at, remove_at, symlink_at, Attrs, Shortfall,
};

pub use meta::{DeviceNode, LayerMeta, SkippedXattr};
pub use path::{PathProblem, RelPath};
use tar::{Kind, Member, Run, TarError, TarReader};

/// Prefix of whiteout names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of aufs bookkeeping names (`.wh..wh.plnk` and friends), never content.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// Bounds on one layer beyond its byte size (which [`crate::images::archive::LayerStream`]
/// enforces).
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Most members accepted in one layer.
    pub max_entries: u64,
    /// Most bytes of file content, holes of sparse files included (a sparse member costs
    /// little to store in the tar but its full size in every copy made later).
    pub max_content_bytes: u64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            max_entries: 4_000_000,
            max_content_bytes: 32 << 30,
        }
    }
}

/// Why a layer could not be extracted. Every variant about a member names it.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The member's name is not acceptable.
    #[error("layer member {member:?} refused: its name {problem}")]
    BadName {
        member: String,
        problem: PathProblem,
    },
    /// The member's hardlink target is not acceptable.
    #[error("layer member {member:?} refused: its hardlink target {target:?} {problem}")]
    BadLinkTarget {
        member: String,
        target: String,
        problem: PathProblem,
    },
    /// The member would do something unsafe or impossible.
    #[error("layer member {member:?} refused: {reason}")]
    Refused { member: String, reason: String },
    /// Too many members.
    #[error("layer has more than {limit} members")]
    TooManyEntries { limit: u64 },
    /// File content (sparse holes included) past the limit.
    #[error("layer member {member:?} takes the layer's file content past {limit} bytes")]
    TooLarge { member: String, limit: u64 },
    /// The tar itself is malformed.
    #[error("malformed layer tar")]
    Tar(#[source] TarError),
    /// A filesystem operation failed.
    #[error("cannot {op} layer member {member:?}")]
    Io {
        op: &'static str,
        member: String,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// The underlying tar or I/O error, if any (to recognise a read failure from below, e.g. a
    /// size limit).
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            LayerError::Tar(TarError::Io { source, .. }) | LayerError::Io { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// Extracts the uncompressed layer tar read from `tar` into `dest` (an empty directory that
/// only this call writes to) and returns the layer's side table. The reader is left just after
/// the end-of-archive marker; the caller reads the rest if it hashes the stream.
pub fn extract_layer<R: Read>(
    tar: R,
    dest: &Path,
    options: &ExtractOptions,
) -> Result<LayerMeta, LayerError> {
    let root = open_dir(dest).map_err(|source| LayerError::Io {
        op: "open the destination for",
        member: "/".into(),
        source,
    })?;
    let mut ex = Extractor {
        root,
        meta: LayerMeta {
            version: meta::META_VERSION,
            ..LayerMeta::default()
        },
        dirs: BTreeMap::new(),
        parent_cache: None,
        buf: vec![0u8; 256 * 1024],
        devices_warned: false,
        max_content_bytes: options.max_content_bytes,
    };
    ex.meta.implicit_dirs.insert(RelPath::root());

    let mut reader = TarReader::new(tar);
    while let Some(member) = reader.next_member().map_err(LayerError::Tar)? {
        ex.meta.entries += 1;
        if ex.meta.entries > options.max_entries {
            return Err(LayerError::TooManyEntries {
                limit: options.max_entries,
            });
        }
        ex.member(&member, &mut reader)?;
    }
    ex.finish_dirs()?;
    ex.find_marker_dirs()?;
    if ex.meta.chown_failures > 0 {
        tracing::warn!(
            count = ex.meta.chown_failures,
            "not privileged: file owners from the layer were not applied"
        );
    }
    Ok(ex.meta)
}

// Public types cross threads.
const _: () = {
    fn check<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn all() {
        check::<LayerMeta>();
        check::<LayerError>();
        check::<ExtractOptions>();
        check::<RelPath>();
    }
};

struct Extractor {
    root: OwnedFd,
    meta: LayerMeta,
    /// Declared directories and their attributes, applied once all content is in.
    dirs: BTreeMap<RelPath, Attrs>,
    /// The last parent directory opened (members come grouped by directory).
    parent_cache: Option<(RelPath, OwnedFd)>,
    buf: Vec<u8>,
    devices_warned: bool,
    max_content_bytes: u64,
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Extractor {
    fn member<R: Read>(&mut self, m: &Member, reader: &mut TarReader<R>) -> Result<(), LayerError> {
        let shown = lossy(&m.name);
        let refused = |reason: String| LayerError::Refused {
            member: shown.clone(),
            reason,
        };
        let path = RelPath::from_member_name(&m.name).map_err(|problem| LayerError::BadName {
            member: shown.clone(),
            problem,
        })?;

        if self.marker(&path, &shown)? {
            return Ok(());
        }

        let Some((parent, name)) = path.split_last() else {
            // The root itself (`./`): only its attributes can change.
            if m.kind != Kind::Dir {
                return Err(refused("the layer root must be a directory".into()));
            }
            let attrs = self.attrs(m, &path, &shown)?;
            self.meta.implicit_dirs.remove(&path);
            self.dirs.insert(path, attrs);
            return Ok(());
        };
        let name = name.to_os_string();
        let dir = self.parent_dir(&parent, &shown)?;
        let io_err = |op: &'static str| {
            let member = shown.clone();
            move |source| LayerError::Io { op, member, source }
        };

        // A hardlink to itself changes nothing (some writers emit one for a re-added file).
        let link_target = match m.kind {
            Kind::Hardlink => Some(RelPath::from_link_target(&m.link).map_err(|problem| {
                LayerError::BadLinkTarget {
                    member: shown.clone(),
                    target: lossy(&m.link),
                    problem,
                }
            })?),
            _ => None,
        };
        if link_target.as_ref() == Some(&path) {
            return match lstat_at(dir.as_fd(), &name).map_err(io_err("inspect"))? {
                Some(_) => Ok(()),
                None => Err(refused("hardlink to itself".into())),
            };
        }

        let dir_stays = self.make_room(dir.as_fd(), &name, &path, m.kind, &shown)?;
        let attrs = self.attrs(m, &path, &shown)?;

        match m.kind {
            Kind::Dir => {
                if !dir_stays {
                    mkdir_at(dir.as_fd(), &name, 0o700).map_err(io_err("create directory"))?;
                }
                self.meta.implicit_dirs.remove(&path);
                self.dirs.insert(path, attrs);
            }
            Kind::File => {
                if self.meta.content_bytes.saturating_add(m.size) > self.max_content_bytes {
                    return Err(LayerError::TooLarge {
                        member: shown,
                        limit: self.max_content_bytes,
                    });
                }
                let file = create_file_at(dir.as_fd(), &name).map_err(io_err("create"))?;
                let written = self.write_content(&file, reader, &shown)?;
                self.meta.content_bytes += written;
                let mut short = Shortfall::default();
                apply_attrs_fd(file.as_fd(), &attrs, &mut short)
                    .map_err(io_err("set attributes of"))?;
                self.record(&path, short);
            }
            Kind::Symlink => {
                if m.link.is_empty() || m.link.contains(&0) {
                    return Err(refused(
                        "symlink with an empty or NUL-containing target".into(),
                    ));
                }
                let target = OsString::from_vec(m.link.clone());
                symlink_at(&target, dir.as_fd(), &name).map_err(io_err("create symlink"))?;
                let mut short = Shortfall::default();
                apply_attrs_at(dir.as_fd(), &name, true, &attrs, &mut short)
                    .map_err(io_err("set attributes of"))?;
                self.record(&path, short);
            }
            Kind::Hardlink => {
                let target = link_target.expect("hardlink target parsed above");
                self.hardlink(dir.as_fd(), &name, path, target, &shown)?;
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => {
                self.special(dir.as_fd(), &name, path, m, &attrs, &shown)?;
            }
        }
        Ok(())
    }

    /// Whiteout and opaque markers become records, never files (`true`: `path` was one).
    fn marker(&mut self, path: &RelPath, shown: &str) -> Result<bool, LayerError> {
        let Some((parent, last)) = path.split_last() else {
            return Ok(false);
        };
        let last = last.as_bytes();
        if parent
            .components()
            .any(|c| c.as_bytes().starts_with(WHITEOUT_PREFIX))
        {
            return Err(self.refused(shown, "a whiteout name is used as a directory".into()));
        }
        if last.starts_with(AUFS_META_PREFIX) && last != OPAQUE_MARKER {
            tracing::debug!(member = %shown, "skipping aufs metadata entry");
            return Ok(true);
        }
        if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
            // The directory holding a marker exists in this layer's tree (as a placeholder
            // when undeclared), so assembly visits it. If this layer made it a file or a
            // symlink, the marker is moot: that member replaces the lower path anyway.
            match self.parent_dir(&parent, shown) {
                Ok(_) => {}
                Err(LayerError::Refused { .. }) => {
                    tracing::debug!(member = %shown, "whiteout under a non-directory is moot");
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
            if last == OPAQUE_MARKER {
                self.meta.opaque_dirs.insert(parent);
                return Ok(true);
            }
            let target = RelPath::from_member_name(hidden)
                .ok()
                .filter(|t| t.depth() == 1)
                .ok_or_else(|| {
                    self.refused(shown, "whiteout of an empty, '.' or '..' name".into())
                })?;
            self.meta
                .whiteouts
                .insert(parent.join(OsStr::from_bytes(target.as_bytes())));
            return Ok(true);
        }
        Ok(false)
    }

    fn refused(&self, shown: &str, reason: String) -> LayerError {
        LayerError::Refused {
            member: shown.to_string(),
            reason,
        }
    }

    /// Makes room for a member at `path` (`name` in `dir`): whatever is there goes (a
    /// directory stays for a directory), unlinked, never written through, together with the
    /// records about it (a hardlink into a lower layer, a skipped device). Returns whether a
    /// directory stays.
    fn make_room(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &RelPath,
        kind: Kind,
        shown: &str,
    ) -> Result<bool, LayerError> {
        let io_err = |source| LayerError::Io {
            op: "replace",
            member: shown.to_string(),
            source,
        };
        let existing = lstat_at(dir, name).map_err(io_err)?;
        if kind == Kind::Dir && existing.as_ref().is_some_and(is_dir) {
            return Ok(true);
        }
        if let Some(st) = existing {
            if is_dir(&st) {
                self.parent_cache = None;
                self.dirs.remove(path);
                let below: Vec<RelPath> = self
                    .dirs
                    .range(path.below())
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in below {
                    self.dirs.remove(&k);
                }
            }
            remove_at(dir, name).map_err(io_err)?;
        }
        self.meta.forget_below(path);
        Ok(false)
    }

    fn attrs(&mut self, m: &Member, path: &RelPath, shown: &str) -> Result<Attrs, LayerError> {
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| LayerError::Refused {
                member: shown.to_string(),
                reason: format!("{what} {v} does not fit 32 bits"),
            })
        };
        Ok(Attrs {
            mode: m.mode,
            uid: id(m.uid, "uid")?,
            gid: id(m.gid, "gid")?,
            mtime: m.mtime,
            xattrs: self.allowed_xattrs(m, path),
        })
    }

    /// The member's xattrs minus overlayfs' own (`trusted.overlay.*`, `user.overlay.*`): in
    /// a lower layer they would steer the guest's overlay mount (opaque, redirect, metacopy),
    /// so they are recorded as skipped instead.
    fn allowed_xattrs(&mut self, m: &Member, path: &RelPath) -> Vec<(OsString, Vec<u8>)> {
        let mut allowed = Vec::new();
        let mut refused = Vec::new();
        for (name, value) in &m.xattrs {
            let name_os = OsString::from_vec(name.clone());
            if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                refused.push((name_os, value.clone(), "reserved for overlayfs".to_string()));
            } else {
                allowed.push((name_os, value.clone()));
            }
        }
        self.meta.record_xattr_failures(path, refused);
        allowed
    }

    /// Opens (creating as needed) the directory `parent`, one component at a time, refusing
    /// to pass through a symlink or a non-directory.
    fn parent_dir(&mut self, parent: &RelPath, shown: &str) -> Result<OwnedFd, LayerError> {
        let io_err = |source| LayerError::Io {
            op: "create the parent directories of",
            member: shown.to_string(),
            source,
        };
        if let Some((cached, fd)) = &self.parent_cache {
            if cached == parent {
                return fd.try_clone().map_err(io_err);
            }
        }
        let mut dir = self.root.try_clone().map_err(io_err)?;
        let mut so_far = RelPath::root();
        for comp in parent.components() {
            so_far = so_far.join(comp);
            let next = match open_dir_at(dir.as_fd(), comp) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    mkdir_at(dir.as_fd(), comp, 0o755).map_err(io_err)?;
                    self.meta.implicit_dirs.insert(so_far.clone());
                    open_dir_at(dir.as_fd(), comp).map_err(io_err)?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    let what = match lstat_at(dir.as_fd(), comp).map_err(io_err)? {
                        Some(st) if file_type(&st) == SFlag::S_IFLNK => {
                            "is a symlink; writing through it could leave the root"
                        }
                        _ => "is not a directory",
                    };
                    return Err(LayerError::Refused {
                        member: shown.to_string(),
                        reason: format!("its parent {so_far} {what}"),
                    });
                }
                Err(e) => return Err(io_err(e)),
            };
            dir = next;
        }
        self.parent_cache = Some((parent.clone(), dir.try_clone().map_err(io_err)?));
        Ok(dir)
    }

    /// Copies the member's content, leaving runs of zeros as holes.
    fn write_content<R: Read>(
        &mut self,
        file: &File,
        reader: &mut TarReader<R>,
        shown: &str,
    ) -> Result<u64, LayerError> {
        let io_err = |source| LayerError::Io {
            op: "write",
            member: shown.to_string(),
            source,
        };
        let mut data = reader.data();
        let mut offset = 0u64;
        loop {
            match data.next_run(&mut self.buf).map_err(LayerError::Tar)? {
                Run::Data(n) => {
                    let chunk = &self.buf[..n];
                    if chunk.iter().any(|&b| b != 0) {
                        file.write_all_at(chunk, offset).map_err(io_err)?;
                    }
                    offset += n as u64;
                }
                Run::Hole(n) => offset += n,
                Run::End => break,
            }
        }
        file.set_len(offset).map_err(io_err)?;
        Ok(offset)
    }

    fn hardlink(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: RelPath,
        target: RelPath,
        shown: &str,
    ) -> Result<(), LayerError> {
        let refused = |reason: String| LayerError::Refused {
            member: shown.to_string(),
            reason,
        };
        let io_err = |source| LayerError::Io {
            op: "create hardlink",
            member: shown.to_string(),
            source,
        };
        let (target_parent, target_name) = target.split_last().expect("target is not the root");

        // Walk to the target's directory inside this layer, never through a symlink.
        let mut tdir = self.root.try_clone().map_err(io_err)?;
        let mut in_layer = true;
        for comp in target_parent.components() {
            match open_dir_at(tdir.as_fd(), comp) {
                Ok(next) => tdir = next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    in_layer = false;
                    break;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(refused(format!(
                        "its hardlink target {target} passes through a symlink or non-directory"
                    )));
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        let found = if in_layer {
            lstat_at(tdir.as_fd(), target_name).map_err(io_err)?
        } else {
            None
        };
        match found {
            Some(st) if is_dir(&st) => Err(refused(format!("hardlink to directory {target}"))),
            Some(_) => link_at(tdir.as_fd(), target_name, dir, name).map_err(io_err),
            None => {
                // Not in this layer: it must be in a lower one; assembly links it there. A chain
                // through another external link points at that link's target.
                let target = self
                    .meta
                    .external_hardlinks
                    .get(&target)
                    .cloned()
                    .unwrap_or(target);
                tracing::debug!(member = %shown, %target, "hardlink into a lower layer");
                self.meta.external_hardlinks.insert(path, target);
                Ok(())
            }
        }
    }

    fn special(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: RelPath,
        m: &Member,
        attrs: &Attrs,
        shown: &str,
    ) -> Result<(), LayerError> {
        let (kind, letter) = match m.kind {
            Kind::Fifo => (SFlag::S_IFIFO, 'p'),
            Kind::CharDevice => (SFlag::S_IFCHR, 'c'),
            _ => (SFlag::S_IFBLK, 'b'),
        };
        let rdev = nix::sys::stat::makedev(u64::from(m.dev_major), u64::from(m.dev_minor));
        match mknod_at(dir, name, kind, rdev) {
            Ok(()) => {}
            Err(e) if kind != SFlag::S_IFIFO && e.raw_os_error() == Some(libc::EPERM) => {
                if !self.devices_warned {
                    tracing::warn!(
                        member = %shown,
                        "not privileged: device nodes are recorded in the layer metadata, not created"
                    );
                    self.devices_warned = true;
                }
                self.meta.skipped_devices.insert(
                    path,
                    DeviceNode {
                        kind: letter,
                        major: m.dev_major,
                        minor: m.dev_minor,
                        mode: attrs.mode,
                        uid: attrs.uid,
                        gid: attrs.gid,
                        mtime: attrs.mtime,
                    },
                );
                return Ok(());
            }
            Err(source) => {
                return Err(LayerError::Io {
                    op: "create node",
                    member: shown.to_string(),
                    source,
                })
            }
        }
        let mut short = Shortfall::default();
        apply_attrs_at(dir, name, false, attrs, &mut short).map_err(|source| LayerError::Io {
            op: "set attributes of",
            member: shown.to_string(),
            source,
        })?;
        self.record(&path, short);
        Ok(())
    }

    fn record(&mut self, path: &RelPath, short: Shortfall) {
        if short.chown_failed {
            self.meta.chown_failures += 1;
        }
        self.meta.record_xattr_failures(path, short.xattrs_failed);
    }

    /// Finds the placeholder directories that hold nothing but whiteout markers (below them
    /// only other such placeholders): assembly must not create them where the lower layers have
    /// nothing.
    fn find_marker_dirs(&mut self) -> Result<(), LayerError> {
        let mut needed: std::collections::BTreeSet<RelPath> = Default::default();
        for path in self.meta.implicit_dirs.iter().rev() {
            if path.is_root() || self.meta.opaque_dirs.contains(path) {
                continue;
            }
            let io_err = |source| LayerError::Io {
                op: "inspect",
                member: path.to_string(),
                source,
            };
            let mut fd = self.root.try_clone().map_err(io_err)?;
            for comp in path.components() {
                fd = open_dir_at(fd.as_fd(), comp).map_err(io_err)?;
            }
            let mut has_content = false;
            for name in list_dir(fd.as_fd()).map_err(io_err)? {
                let child = path.join(&name);
                let st = lstat_at(fd.as_fd(), &name).map_err(io_err)?;
                let placeholder = st.as_ref().is_some_and(is_dir)
                    && self.meta.implicit_dirs.contains(&child)
                    && !self.meta.opaque_dirs.contains(&child)
                    && !needed.contains(&child);
                if !placeholder {
                    has_content = true;
                    break;
                }
            }
            if !has_content
                && self
                    .meta
                    .external_hardlinks
                    .range(path.below())
                    .next()
                    .is_none()
                && self
                    .meta
                    .skipped_devices
                    .range(path.below())
                    .next()
                    .is_none()
            {
                self.meta.marker_dirs.insert(path.clone());
            } else {
                needed.insert(path.clone());
            }
        }
        Ok(())
    }

    /// Applies declared directories' attributes, deepest first, now that their content is in.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        self.parent_cache = None;
        let dirs = std::mem::take(&mut self.dirs);
        for (path, attrs) in dirs.iter().rev() {
            let shown = path.to_string();
            let io_err = |source| LayerError::Io {
                op: "set attributes of",
                member: shown.clone(),
                source,
            };
            let mut fd = self.root.try_clone().map_err(io_err)?;
            for comp in path.components() {
                fd = open_dir_at(fd.as_fd(), comp).map_err(io_err)?;
            }
            let mut short = Shortfall::default();
            fsops::drop_unlisted_xattrs(fd.as_fd(), attrs).map_err(io_err)?;
            apply_attrs_fd(fd.as_fd(), attrs, &mut short).map_err(io_err)?;
            self.record(path, short);
        }
        Ok(())
    }
}
