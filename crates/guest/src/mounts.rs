//! The Box's own mounts, made inside its root after the switch: the kernel filesystems a Linux
//! userland expects (as runc sets them up), then the host's volumes and shares in the order given.
//!
//! Paths are resolved after `chroot`, so a symlink in the image can only lead somewhere inside the
//! Box. A single-file share mounts its source on a staging directory in /dev, bind-mounts the one
//! file onto the target, and detaches the staging mount; a read-only mount of a disk or share that
//! is already mounted read-write elsewhere in the Box goes the same way with the whole directory.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use boxlite_protocol::{MountSource, MountSpec};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::console::log;
use crate::disk::{self, DISK_WAIT};
use crate::early::mount_pseudo;

/// Errors about one mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error("mount target {0:?} is not an absolute path")]
    RelativeTarget(String),
    #[error("file {file:?} of the share for {target} must be a relative path inside the share")]
    BadFile { file: String, target: String },
    #[error("file {file:?} does not exist in the share mounted for {target}")]
    MissingFile { file: String, target: String },
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {what} on {target} failed: {errno}")]
    Mount {
        what: String,
        target: String,
        errno: nix::errno::Errno,
    },
}

/// /proc, /sys, /dev, /dev/pts, /dev/shm and a world-writable /tmp in the (new) root.
pub fn mount_system() -> io::Result<()> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_pseudo("proc", "/proc", hardened, None)?;
    mount_pseudo("sysfs", "/sys", hardened, None)?;
    mount_pseudo("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_pseudo(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_pseudo(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    // cgroup v2, where container-aware programs look for their limits; a kernel without it is
    // not a reason to fail the Box.
    if let Err(e) = mount_pseudo("cgroup2", "/sys/fs/cgroup", hardened, None) {
        log!("{e}");
    }
    // /dev/ptmx must open the new devpts instance; the rest are the links docker provides.
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let is_link = fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            let _ = fs::remove_file(link);
            std::os::unix::fs::symlink(target, link)?;
        }
    }
    let tmp = Path::new("/tmp");
    if !tmp.is_dir() {
        fs::create_dir_all(tmp)?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o1777))?;
    }
    Ok(())
}

/// Mounts one volume or share inside the Box (the caller has switched root).
pub fn mount_one(spec: &MountSpec, index: usize) -> Result<(), MountError> {
    if !spec.target.starts_with('/') {
        return Err(MountError::RelativeTarget(spec.target.clone()));
    }
    let (source, fstype, what) = match &spec.source {
        MountSource::Block { serial, fstype, .. } => {
            let device = disk::find_by_serial(serial, DISK_WAIT)?;
            let what = format!("disk {serial:?} ({})", device.display());
            (device.to_string_lossy().into_owned(), fstype.clone(), what)
        }
        MountSource::Virtiofs { tag } => (
            tag.clone(),
            "virtiofs".to_string(),
            format!("virtiofs share {tag:?}"),
        ),
    };
    let flags = if spec.readonly {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let mount_err = |target: &Path, errno| MountError::Mount {
        what: what.clone(),
        target: target.display().to_string(),
        errno,
    };
    let target = PathBuf::from(&spec.target);

    let inner = match &spec.file {
        None => {
            create_dir(&target)?;
            let direct = mount(
                Some(source.as_str()),
                &target,
                Some(fstype.as_str()),
                flags,
                None::<&str>,
            );
            match direct {
                Ok(()) => return Ok(()),
                // The same disk or share is already mounted read-write elsewhere in the Box, and
                // the kernel refuses a second mount with other flags: bind a read-only view.
                Err(nix::errno::Errno::EBUSY) if spec.readonly => None,
                Err(e) => return Err(mount_err(&target, e)),
            }
        }
        Some(file) => Some(relative_inside(file).ok_or_else(|| MountError::BadFile {
            file: file.clone(),
            target: spec.target.clone(),
        })?),
    };

    let staging = PathBuf::from(format!("/dev/.boxlite-share-{index}"));
    create_dir(&staging)?;
    // The share itself is mounted read-write when it can be; the bind mount carries the
    // read-only flag.
    let mount_share = |flags| {
        mount(
            Some(source.as_str()),
            &staging,
            Some(fstype.as_str()),
            flags,
            None::<&str>,
        )
    };
    let result = mount_share(MsFlags::empty())
        .or_else(|_| mount_share(MsFlags::MS_RDONLY))
        .map_err(|e| mount_err(&staging, e))
        .and_then(|()| match &inner {
            Some(inner) => bind(&staging.join(inner), &target, spec, &mount_err),
            None => bind(&staging, &target, spec, &mount_err),
        });
    let _ = umount2(&staging, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&staging);
    result
}

/// Bind-mounts `source` (a file or a directory) on `target`, read-only when the spec says so.
fn bind(
    source: &Path,
    target: &Path,
    spec: &MountSpec,
    mount_err: &dyn Fn(&Path, nix::errno::Errno) -> MountError,
) -> Result<(), MountError> {
    if !source.exists() {
        return Err(MountError::MissingFile {
            file: spec.file.clone().unwrap_or_default(),
            target: spec.target.clone(),
        });
    }
    if source.is_dir() {
        create_dir(target)?;
    } else {
        if let Some(parent) = target.parent() {
            create_dir(parent)?;
        }
        if !target.exists() {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target)
                .map_err(|source| MountError::Prepare {
                    path: target.to_path_buf(),
                    source,
                })?;
        }
    }
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| mount_err(target, e))?;
    if spec.readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| mount_err(target, e))?;
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    fs::create_dir_all(path).map_err(|source| MountError::Prepare {
        path: path.to_path_buf(),
        source,
    })
}

/// `file` as a path that cannot leave the share (no root, no `..`).
fn relative_inside(file: &str) -> Option<PathBuf> {
    let path = Path::new(file);
    let ok = !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_files_cannot_escape_the_share() {
        assert_eq!(
            relative_inside("conf/app.toml"),
            Some(PathBuf::from("conf/app.toml"))
        );
        assert_eq!(relative_inside("../etc/shadow"), None);
        assert_eq!(relative_inside("/etc/shadow"), None);
        assert_eq!(relative_inside(""), None);
    }
}
