//! The `-v` mounts of a running Box: named volumes attached as virtio-blk disks (leased so no
//! other running Box writes them at the same time) and host paths shared through one virtiofsd
//! each. Everything started here is stopped, and every lease released, when the Box stops.
//!
//! Leases of Boxes that died without releasing them (a killed shim) are released before
//! acquiring (see [`release_stale_leases`]); QEMU's own image locks stay a second guard.

use std::path::PathBuf;

use boxlite_protocol::{GuestSetup, MountSource, MountSpec};
use tracing::warn;

use crate::home::Home;
use crate::runtime::config::MountConfig;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::{release_stale_leases, BoxRecord};
use crate::state::Db;
use crate::vmm::{DiskSpec, FsShareSpec, VmSpec};
use crate::volumes::store::{VolumeError, Volumes};
use crate::volumes::virtiofs::{plan_share, ShareOptions, Virtiofsd};

/// Helper processes, leases and staging folders of one running Box.
#[derive(Debug, Default)]
pub struct MountHelpers {
    daemons: Vec<Virtiofsd>,
    leased: Vec<String>,
    /// Folders holding the hard link of a single-file share; removed at stop so the host file's
    /// link count is back to what its owner expects while the Box is not running.
    staging: Vec<PathBuf>,
    home: Option<Home>,
    box_id: String,
}

impl MountHelpers {
    /// Stops the virtiofs daemons and releases the volume leases.
    pub fn stop(&mut self) {
        for daemon in self.daemons.drain(..) {
            daemon.stop();
        }
        for dir in self.staging.drain(..) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(path = %dir.display(), "removing a share's staging folder: {e}");
            }
        }
        if self.leased.is_empty() {
            return;
        }
        if let Some(home) = &self.home {
            match Volumes::open(home) {
                Ok(mut volumes) => {
                    for name in self.leased.drain(..) {
                        if let Err(e) = volumes.release(&name, &self.box_id) {
                            warn!(volume = %name, "releasing volume: {e}");
                        }
                    }
                }
                Err(e) => warn!("cannot open the volume store to release leases: {e}"),
            }
        }
    }
}

impl Drop for MountHelpers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Adds the Box's mounts to the VM and to the agent's setup.
pub fn attach(
    home: &Home,
    record: &BoxRecord,
    paths: &BoxPaths,
    vm: &mut VmSpec,
    guest: &mut GuestSetup,
) -> Result<MountHelpers, String> {
    let mut helpers = MountHelpers {
        daemons: Vec::new(),
        leased: Vec::new(),
        staging: Vec::new(),
        home: Some(home.clone()),
        box_id: record.id.clone(),
    };
    check_device_budget(record.config.mounts.len(), vm)?;
    let mut volumes = None;
    for (index, mount) in record.config.mounts.iter().enumerate() {
        match mount {
            MountConfig::Volume {
                name,
                guest: target,
                readonly,
            } => {
                if volumes.is_none() {
                    volumes = Some(open_volumes(home)?);
                }
                let store = volumes.as_mut().expect("opened above");
                let lease = store
                    .acquire(name, &record.id, !readonly)
                    .map_err(|e| explain_acquire_error(name, e))?;
                helpers.leased.push(name.clone());
                vm.disks.push(DiskSpec {
                    path: lease.path.clone(),
                    format: lease.format().as_str().into(),
                    serial: lease.serial.clone(),
                    readonly: *readonly,
                });
                guest.mounts.push(lease.mount_spec(target));
            }
            MountConfig::HostPath {
                host,
                guest: target,
                readonly,
            } => {
                let staging = paths.dir.join("shares").join(index.to_string());
                let plan = plan_share(host.as_ref(), *readonly, &staging)
                    .map_err(|e| format!("share {host}: {e}"))?;
                if plan.shared_dir == staging {
                    helpers.staging.push(staging);
                }
                let tag = format!("share{index}");
                let socket = paths.share_socket(index);
                let mut options = ShareOptions::new(&tag, &socket);
                options.cache = share_cache_policy();
                options.log_path = Some(paths.dir.join(format!("virtiofsd-{index}.log")));
                let daemon =
                    Virtiofsd::spawn(&plan, &options).map_err(|e| format!("share {host}: {e}"))?;
                helpers.daemons.push(daemon);
                vm.shares.push(FsShareSpec {
                    socket,
                    tag: tag.clone(),
                });
                guest.mounts.push(MountSpec {
                    source: MountSource::Virtiofs { tag },
                    target: target.clone(),
                    readonly: plan.readonly,
                    file: plan.file,
                });
            }
        }
    }
    Ok(helpers)
}

/// PCI slots the VMM's machine offers its devices: QEMU's q35 root bus has 32, of which the host
/// bridge takes slot 0 and the LPC, SATA and SMBus functions take slot 31 (`-nodefaults` adds no
/// VGA or NIC). Every virtio device of a Box is one PCI device (see `crate::vmm::qemu`).
const PCI_SLOTS: usize = 30;

/// Refuses, before anything starts, a Box with more volumes and shares than the machine has
/// slots left after the agent's port, the root disk and the NIC. Otherwise QEMU would exit during
/// boot with nothing but its log to say why.
fn check_device_budget(mounts: usize, vm: &VmSpec) -> Result<(), String> {
    let own = 1 + vm.disks.len() + usize::from(vm.nic.is_some()) + vm.shares.len();
    let room = PCI_SLOTS.saturating_sub(own);
    if mounts > room {
        return Err(format!(
            "too many -v mounts: {mounts} volumes and shares, but a Box has room for {room} \
             ({PCI_SLOTS} device slots, {own} taken by the agent port, the root disk and the \
             network card); share a common parent folder instead of many folders"
        ));
    }
    Ok(())
}

/// The volume store, after releasing the leases of Boxes that are gone.
fn open_volumes(home: &Home) -> Result<Volumes, String> {
    let db = Db::open(home).map_err(|e| format!("cannot open the state database: {e}"))?;
    if let Err(e) = release_stale_leases(&db, home) {
        warn!("cannot release stale volume leases: {e}");
    }
    Volumes::open(home).map_err(|e| format!("cannot open the volume store: {e}"))
}

/// A refused attach in the user's words: the holder by name, what to do about it.
fn explain_acquire_error(name: &str, error: VolumeError) -> String {
    match error {
        VolumeError::Conflict {
            holder,
            mode,
            wanted,
            ..
        } => format!(
            "volume {name} is attached {mode} to running box {holder}; it cannot also be \
             attached {wanted} (stop or remove {holder} first, or attach {name} read-only in both)"
        ),
        other => {
            let text = super::error_chain(&other);
            if text.contains(name) {
                text
            } else {
                format!("volume {name}: {text}")
            }
        }
    }
}

/// virtiofsd's cache policy for host shares: `never` unless `BOXLITE_SHARE_CACHE` names another
/// (`auto`, `always`, `metadata`).
///
/// `never` keeps the guest coherent with the host: a file the host changes reads new in the guest
/// at once. With `auto` the guest keeps attributes for a second, so a host change read within
/// that second comes back cut to the old size (measured: "two-longer" read as "two-"). The price
/// of `never` on the 6.1 guest kernel: a file on a share cannot be mapped shared and writable
/// (`mmap(MAP_SHARED)` of such a file fails with ENODEV; private maps, hence running programs from
/// a share, work), and every lookup goes to the host.
fn share_cache_policy() -> String {
    match std::env::var("BOXLITE_SHARE_CACHE") {
        Ok(p) if ["auto", "always", "never", "metadata"].contains(&p.as_str()) => p,
        Ok(p) if !p.is_empty() => {
            warn!(policy = %p, "unknown BOXLITE_SHARE_CACHE; using never");
            "never".to_string()
        }
        _ => "never".to_string(),
    }
}
