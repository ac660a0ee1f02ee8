//! Assembles a Box from `Control::Setup`: root disk, fresh volumes formatted, switch into the
//! root, system mounts, the host's mounts, injected files, host name, network.
//!
//! The root is switched the way util-linux's `switch_root` does it (mount the new root, move it
//! over `/`, `chroot .`); the initramfs's files are deleted first to give their memory back.
//! Everything after the switch happens inside the Box's root, so the image's symlinks resolve
//! within it. Until the switch nothing is irreversible: a failed attempt is undone and the host may
//! send `Setup` again; after it, a failure leaves the Box failed.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use boxlite_protocol::{FileSpec, GuestSetup, MountSource};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::console::log;
use crate::reaper::Reaper;
use crate::{dhcp, disk, modules, mounts, netif};

/// Where the root disk is mounted before the switch.
const NEW_ROOT: &str = "/newroot";

/// What went wrong while assembling the Box.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("root disk: {0}")]
    RootDisk(#[source] disk::DiskError),
    #[error("mounting the root disk {serial:?} ({device}) as {fstype} failed: {errno}")]
    MountRoot {
        serial: String,
        device: PathBuf,
        fstype: String,
        errno: nix::errno::Errno,
    },
    #[error("growing the root filesystem: {0}")]
    Grow(#[source] disk::DiskError),
    #[error("volume: {0}")]
    Volume(#[source] disk::DiskError),
    #[error("switching into the Box's root failed at {step}: {errno}")]
    SwitchRoot {
        step: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("system mounts inside the Box: {0}")]
    System(#[source] io::Error),
    #[error("mount {index} ({target}): {source}")]
    Mount {
        index: usize,
        target: String,
        #[source]
        source: mounts::MountError,
    },
    #[error("writing {path}: {source}")]
    File {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("setting the host name to {name:?}: {errno}")]
    Hostname {
        name: String,
        errno: nix::errno::Errno,
    },
    #[error("network: {0}")]
    Network(String),
    #[error(
        "an earlier setup failed after switching into the Box's root; the Box must be restarted"
    )]
    Broken,
    #[error("the Box is already set up; Setup is accepted once per boot")]
    AlreadySetUp,
}

/// Where the Box is in its assembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Still in the initramfs; a setup may be attempted.
    Initramfs,
    /// Switched into the Box's root but the rest failed.
    Broken,
    /// Assembled.
    Ready,
}

/// Runs the whole setup; returns the Box's IP address when it has a network.
pub fn assemble(
    setup: &GuestSetup,
    stage: &mut Stage,
    reaper: &Reaper,
) -> Result<Option<String>, SetupError> {
    match *stage {
        Stage::Initramfs => {}
        Stage::Broken => return Err(SetupError::Broken),
        Stage::Ready => return Err(SetupError::AlreadySetUp),
    }
    if let Err(e) = netif::bring_up("lo") {
        log!("bringing up lo failed: {e}");
    }

    if let Err(e) = prepare_root(setup, reaper) {
        let _ = umount2(NEW_ROOT, MntFlags::MNT_DETACH);
        return Err(e);
    }
    *stage = Stage::Broken;
    switch_root()?;
    let ip = inside_root(setup)?;
    *stage = Stage::Ready;
    Ok(ip)
}

/// Root disk mounted at NEW_ROOT and grown; fresh volumes formatted (mke2fs lives in the
/// initramfs, so this happens before the switch).
fn prepare_root(setup: &GuestSetup, reaper: &Reaper) -> Result<(), SetupError> {
    let serial = &setup.root.serial;
    let device = disk::find_by_serial(serial, disk::DISK_WAIT).map_err(SetupError::RootDisk)?;
    let fstype = if setup.root.fstype.is_empty() {
        "ext4"
    } else {
        setup.root.fstype.as_str()
    };
    load_modules(setup);
    fs::create_dir_all(NEW_ROOT).map_err(SetupError::System)?;
    mount(
        Some(&device),
        NEW_ROOT,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| SetupError::MountRoot {
        serial: serial.clone(),
        device: device.clone(),
        fstype: fstype.to_string(),
        errno,
    })?;
    log!("root disk {serial:?} ({}) mounted", device.display());
    if setup.grow_root {
        let blocks = disk::grow(&device, Path::new(NEW_ROOT)).map_err(SetupError::Grow)?;
        log!("root filesystem spans {blocks} blocks");
    }

    for spec in &setup.mounts {
        if let MountSource::Block {
            serial,
            fstype,
            format_if_empty: true,
        } = &spec.source
        {
            let device =
                disk::find_by_serial(serial, disk::DISK_WAIT).map_err(SetupError::Volume)?;
            if disk::format_if_empty(&device, serial, fstype, reaper).map_err(SetupError::Volume)? {
                log!(
                    "formatted fresh volume {serial:?} ({}) as {fstype}",
                    device.display()
                );
            }
        }
    }
    Ok(())
}

/// Loads the drivers this Box's filesystems and NIC need.
fn load_modules(setup: &GuestSetup) {
    modules::ensure(modules::for_filesystem(&setup.root.fstype));
    for spec in &setup.mounts {
        match &spec.source {
            MountSource::Block { fstype, .. } => modules::ensure(modules::for_filesystem(fstype)),
            MountSource::Virtiofs { .. } => modules::ensure("virtiofs"),
        }
    }
    if setup.network.is_some() {
        modules::ensure("virtio_net");
    }
}

/// Moves NEW_ROOT over `/` and enters it, freeing the initramfs's files first.
fn switch_root() -> Result<(), SetupError> {
    let fail = |step| move |errno| SetupError::SwitchRoot { step, errno };
    let _ = fs::remove_dir_all("/boxlite");
    let _ = fs::remove_file("/init");
    nix::unistd::chdir(NEW_ROOT).map_err(fail("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(fail("moving the root mount"))?;
    nix::unistd::chroot(".").map_err(fail("chroot"))?;
    nix::unistd::chdir("/").map_err(fail("chdir /"))?;
    Ok(())
}

fn inside_root(setup: &GuestSetup) -> Result<Option<String>, SetupError> {
    mounts::mount_system().map_err(SetupError::System)?;
    for (index, spec) in setup.mounts.iter().enumerate() {
        mounts::mount_one(spec, index).map_err(|source| SetupError::Mount {
            index,
            target: spec.target.clone(),
            source,
        })?;
    }
    for file in &setup.files {
        write_file(file).map_err(|source| SetupError::File {
            path: file.path.clone(),
            source,
        })?;
    }
    if !setup.hostname.is_empty() {
        nix::unistd::sethostname(&setup.hostname).map_err(|errno| SetupError::Hostname {
            name: setup.hostname.clone(),
            errno,
        })?;
    }
    match &setup.network {
        None => Ok(None),
        Some(network) => dhcp::configure(network).map_err(SetupError::Network),
    }
}

/// Writes `file` under a temporary name and renames it into place; an existing symlink at the
/// path is replaced, not followed.
fn write_file(file: &FileSpec) -> io::Result<()> {
    let path = Path::new(&file.path);
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path is not absolute",
        ));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.boxlite-tmp"));
    let mut out = fs::File::create(&staging)?;
    out.write_all(file.contents.as_bytes())?;
    let mode = if file.mode == 0 {
        0o644
    } else {
        file.mode & 0o7777
    };
    out.set_permissions(fs::Permissions::from_mode(mode))?;
    out.sync_all()?;
    drop(out);
    fs::rename(&staging, path).inspect_err(|_| {
        let _ = fs::remove_file(&staging);
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn files_replace_a_symlink_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, "keep me\n").unwrap();
        let path = dir.path().join("etc/resolv.conf");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();

        let spec = FileSpec {
            path: path.to_string_lossy().into_owned(),
            contents: "nameserver 192.168.127.1\n".into(),
            mode: 0o600,
        };
        write_file(&spec).unwrap();

        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep me\n");
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), spec.contents);
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no staging left"
        );
    }

    #[test]
    fn relative_file_paths_are_refused() {
        let spec = FileSpec {
            path: "etc/hosts".into(),
            contents: String::new(),
            mode: 0o644,
        };
        assert!(write_file(&spec).is_err());
    }
}
