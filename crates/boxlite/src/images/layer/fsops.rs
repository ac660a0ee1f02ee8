//! Filesystem operations relative to directory descriptors that never follow a symlink the
//! caller did not ask to follow.
//!
//! Extraction and assembly work in trees that hostile layers shaped: any name may be a symlink
//! planted to redirect a write out of the root. So nothing here takes a multi-component path
//! except [`open_in_root`], which resolves with `openat2(RESOLVE_IN_ROOT)` (Linux 5.6): symlinks
//! are followed as if the root were `/`, and `..` stops at the root. Everything else acts on one
//! name inside an open directory, with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

/// Ownership, permission bits, extended attributes and modification time of one inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits with setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Name and value, in the order they are applied.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// What could not be applied to an inode (unprivileged runs, filesystems without xattrs). The
/// caller records it; none of it is silently dropped.
#[derive(Debug, Default)]
pub struct Shortfall {
    /// Ownership was left as the current user's.
    pub chown_failed: bool,
    /// Extended attributes that could not be set: name, value, why.
    pub xattrs_failed: Vec<(OsString, Vec<u8>, String)>,
}

pub fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn owned(raw: i32) -> OwnedFd {
    // SAFETY: `raw` was just returned by a successful open call and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Opens a directory by a trusted host path (the roots we create ourselves).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    Ok(owned(raw))
}

/// Opens the directory `name` inside `dir`; fails (`ELOOP`/`ENOTDIR`) when it is a symlink or
/// not a directory.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    Ok(owned(raw))
}

/// Opens the directory at `path` below `root`, following symlinks as if `root` were `/`
/// (`RESOLVE_IN_ROOT`): nothing outside `root` is ever reached.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let raw = nix::fcntl::openat2(root.as_raw_fd(), path, how).map_err(errno_io)?;
    Ok(owned(raw))
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno_io(e)),
    }
}

pub fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

/// The names in a directory, without `.` and `..`, sorted bytewise.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let dup = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    let mut listing = nix::dir::Dir::from_fd(dup).map_err(errno_io)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(errno_io)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Removes `name` from `dir`, recursively when it is a directory, never following a symlink.
/// Missing is fine.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&st) {
        let sub = match open_dir_at(dir, name) {
            Ok(sub) => sub,
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                // Unprivileged and the directory is not readable: make it so, it is going away.
                nix::sys::stat::fchmodat(
                    Some(dir.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o700),
                    nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                )
                .map_err(errno_io)?;
                open_dir_at(dir, name)?
            }
            Err(e) => return Err(e),
        };
        if !euid_is_root() && st.st_mode & 0o300 != 0o300 {
            // Our own read-only directory (a layer said 0555): make it writable to empty it.
            set_mode(sub.as_fd(), (st.st_mode & 0o7777) | 0o700)?;
        }
        clear_dir(sub.as_fd())?;
        nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
            .map_err(errno_io)
    } else {
        match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(errno_io(e)),
        }
    }
}

/// Removes everything inside `dir`.
pub fn clear_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    for name in list_dir(dir)? {
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Removes a tree by host path (our own staging directories); missing is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot remove a root",
        ));
    };
    let parent = match open_dir(parent) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_at(parent.as_fd(), name)
}

/// The host path a descriptor points at (for error messages and for re-resolving a directory
/// reached through a symlink).
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The `/proc` path naming `name` inside `dir`, for the calls that have no `*at` form (the
/// `l*xattr` family). `name` is one component, and the `l` calls do not follow it.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

pub fn euid_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown_result(r: nix::Result<()>, attrs: &Attrs, short: &mut Shortfall) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(Errno::EPERM | Errno::EINVAL) if !euid_is_root() => {
            let me = (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            );
            if (attrs.uid, attrs.gid) != me {
                short.chown_failed = true;
            }
            Ok(())
        }
        Err(e) => Err(errno_io(e)),
    }
}

fn xattr_result(r: io::Result<()>, name: &OsStr, value: &[u8], short: &mut Shortfall) {
    if let Err(e) = r {
        short
            .xattrs_failed
            .push((name.to_os_string(), value.to_vec(), e.to_string()));
    }
}

/// Applies `attrs` to an open regular file or directory, in the order the kernel needs:
/// owner first (chown clears setuid/setgid and `security.capability`), then xattrs, then the
/// mode with its special bits, then the times.
pub fn apply_attrs_fd(fd: BorrowedFd<'_>, attrs: &Attrs, short: &mut Shortfall) -> io::Result<()> {
    chown_result(
        nix::unistd::fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(attrs.uid)),
            Some(Gid::from_raw(attrs.gid)),
        ),
        attrs,
        short,
    )?;
    if !attrs.xattrs.is_empty() {
        let file = File::from(fd.try_clone_to_owned()?);
        for (name, value) in &attrs.xattrs {
            xattr_result(
                xattr::FileExt::set_xattr(&file, name, value),
                name,
                value,
                short,
            );
        }
    }
    nix::sys::stat::fchmod(
        fd.as_raw_fd(),
        Mode::from_bits_truncate(attrs.mode & 0o7777),
    )
    .map_err(errno_io)?;
    let t = timespec(attrs.mtime);
    nix::sys::stat::futimens(fd.as_raw_fd(), &t, &t).map_err(errno_io)
}

/// Removes the extended attributes of an open directory that `attrs` does not list: a declared
/// directory that already existed gets exactly the layer's set, as a new one would (the
/// host's `security.selinux` label stays).
pub fn drop_unlisted_xattrs(fd: BorrowedFd<'_>, attrs: &Attrs) -> io::Result<()> {
    let file = File::from(fd.try_clone_to_owned()?);
    for name in xattr::FileExt::list_xattr(&file)? {
        let listed = attrs.xattrs.iter().any(|(n, _)| *n == name);
        if !listed && name != "security.selinux" {
            match xattr::FileExt::remove_xattr(&file, &name) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EPERM)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Applies `attrs` to `name` in `dir` that is a symlink, device node or FIFO (things we cannot
/// open without side effects). `name` was just created by us in a tree only we write to.
pub fn apply_attrs_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    is_symlink: bool,
    attrs: &Attrs,
    short: &mut Shortfall,
) -> io::Result<()> {
    chown_result(
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            name,
            Some(Uid::from_raw(attrs.uid)),
            Some(Gid::from_raw(attrs.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ),
        attrs,
        short,
    )?;
    for (xname, value) in &attrs.xattrs {
        xattr_result(
            xattr::set(proc_path(dir, name), xname, value),
            xname,
            value,
            short,
        );
    }
    if !is_symlink {
        // Linux has no lchmod; `name` is not a symlink (we created it), so following is moot.
        nix::sys::stat::fchmodat(
            Some(dir.as_raw_fd()),
            name,
            Mode::from_bits_truncate(attrs.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(errno_io)?;
    }
    let t = timespec(attrs.mtime);
    nix::sys::stat::utimensat(
        Some(dir.as_raw_fd()),
        name,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(errno_io)
}

/// Reads the attributes of `name` in `dir` (not following it).
pub fn read_attrs_at(dir: BorrowedFd<'_>, name: &OsStr, st: &FileStat) -> io::Result<Attrs> {
    let path = proc_path(dir, name);
    let mut xattrs = Vec::new();
    for xname in xattr::list(&path)? {
        if let Some(value) = xattr::get(&path, &xname)? {
            xattrs.push((xname, value));
        }
    }
    Ok(Attrs {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        xattrs,
    })
}

/// Access and modification times of an open inode.
pub fn times(fd: BorrowedFd<'_>) -> io::Result<(TimeSpec, TimeSpec)> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(errno_io)?;
    Ok((
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    ))
}

/// Puts back times read with [`times`].
pub fn set_times(fd: BorrowedFd<'_>, (atime, mtime): (TimeSpec, TimeSpec)) -> io::Result<()> {
    nix::sys::stat::futimens(fd.as_raw_fd(), &atime, &mtime).map_err(errno_io)
}

/// `fchmod`.
pub fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(errno_io)
}

pub fn timespec((secs, nanos): (i64, u32)) -> TimeSpec {
    TimeSpec::new(secs, i64::from(nanos))
}

/// Creates a regular file `name` in `dir`, failing if anything exists there.
pub fn create_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let raw = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(errno_io)?;
    Ok(File::from(owned(raw)))
}

/// Copies `from` into the empty file `to`, keeping holes as holes (`SEEK_DATA`/`SEEK_HOLE`)
/// and copying data in the kernel where it can (`copy_file_range`).
pub fn copy_sparse(from: &File, to: &File) -> io::Result<()> {
    use nix::unistd::{lseek, Whence};
    let len = from.metadata()?.len();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    while pos < end {
        let data = match lseek(from.as_raw_fd(), pos, Whence::SeekData) {
            Ok(offset) => offset,
            Err(Errno::ENXIO) => break,
            // No hole support: copy everything from here.
            Err(Errno::EINVAL) => pos,
            Err(e) => return Err(errno_io(e)),
        };
        let hole = match lseek(from.as_raw_fd(), data, Whence::SeekHole) {
            Ok(offset) => offset.min(end),
            Err(Errno::EINVAL) => end,
            Err(e) => return Err(errno_io(e)),
        };
        copy_range(from, to, data, hole)?;
        pos = hole;
    }
    to.set_len(len)
}

/// Copies bytes `[start, stop)` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: i64, stop: i64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out) = (start, start);
    while off_in < stop {
        let want = usize::try_from(stop - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(_) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                let mut buf = vec![0u8; 1 << 20];
                while off_in < stop {
                    let want = usize::try_from(stop - off_in)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let n = from.read_at(&mut buf[..want], off_in as u64)?;
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    to.write_all_at(&buf[..n], off_in as u64)?;
                    off_in += n as i64;
                }
                return Ok(());
            }
            Err(e) => return Err(errno_io(e)),
        }
    }
    Ok(())
}

/// Opens the regular file `name` in `dir` for reading, refusing symlinks.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let raw = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io)?;
    Ok(File::from(owned(raw)))
}

/// Creates a directory `name` in `dir` (private mode until its own attributes are applied).
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(mode))
        .map_err(errno_io)
}

/// Hard-links `from_name` in `from_dir` as `name` in `dir`, not following a symlink source.
pub fn link_at(
    from_dir: BorrowedFd<'_>,
    from_name: &OsStr,
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<()> {
    nix::unistd::linkat(
        Some(from_dir.as_raw_fd()),
        from_name,
        Some(dir.as_raw_fd()),
        name,
        AtFlags::empty(),
    )
    .map_err(errno_io)
}

pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    nix::unistd::symlinkat(target, Some(dir.as_raw_fd()), name).map_err(errno_io)
}

pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name).map_err(errno_io)
}

/// Creates a device node or FIFO; `kind` is `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, kind: SFlag, rdev: u64) -> io::Result<()> {
    nix::sys::stat::mknodat(
        Some(dir.as_raw_fd()),
        name,
        kind,
        Mode::from_bits_truncate(0o600),
        rdev,
    )
    .map_err(errno_io)
}

/// `fsync` of a directory, so a rename out of staging is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::from(open_dir(path)?).sync_all()
}
