//! The `-v` mounts of a running Box: named volumes attached as virtio-blk disks (leased so no
//! other running Box writes them at the same time) and host paths shared through one virtiofsd
//! each. Everything started here is stopped, and every lease released, when the Box stops.

use boxlite_protocol::{GuestSetup, MountSource, MountSpec};
use tracing::warn;

use crate::home::Home;
use crate::runtime::config::MountConfig;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::BoxRecord;
use crate::vmm::{DiskSpec, FsShareSpec, VmSpec};
use crate::volumes::store::Volumes;
use crate::volumes::virtiofs::{plan_share, ShareOptions, Virtiofsd};

/// Helper processes and leases of one running Box.
#[derive(Debug, Default)]
pub struct MountHelpers {
    daemons: Vec<Virtiofsd>,
    leased: Vec<String>,
    home: Option<Home>,
    box_id: String,
}

impl MountHelpers {
    /// Stops the virtiofs daemons and releases the volume leases.
    pub fn stop(&mut self) {
        for daemon in self.daemons.drain(..) {
            daemon.stop();
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
        home: Some(home.clone()),
        box_id: record.id.clone(),
    };
    let mut volumes = None;
    for (index, mount) in record.config.mounts.iter().enumerate() {
        match mount {
            MountConfig::Volume {
                name,
                guest: target,
                readonly,
            } => {
                if volumes.is_none() {
                    volumes = Some(Volumes::open(home).map_err(|e| e.to_string())?);
                }
                let store = volumes.as_mut().expect("opened above");
                let lease = store
                    .acquire(name, &record.id, !readonly)
                    .map_err(|e| format!("volume {name}: {e}"))?;
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
                let tag = format!("share{index}");
                let socket = paths.share_socket(index);
                let mut options = ShareOptions::new(&tag, &socket);
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
