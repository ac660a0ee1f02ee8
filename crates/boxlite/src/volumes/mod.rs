//! Volumes: named QCOW2 volumes (thin, persistent, snapshots, backing volumes) and host directory
//! shares over virtiofs.
//!
//! - [`name`]: which volume names are accepted.
//! - [`store`]: [`Volumes`], the named volumes, their snapshots and the leases Boxes hold.
//! - [`virtiofs`]: one `virtiofsd` per host-directory share, and the QEMU arguments for it.
//!
//! How the runtime uses it when starting a Box with `-v data:/data -v /srv/www:/www:ro`:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use boxlite::home::Home;
//! use boxlite::rootfs::attach::{BlockTransport, DiskAttachment};
//! use boxlite::volumes::virtiofs::{memory_backend_args, plan_share, ShareOptions, Transport, Virtiofsd};
//! use boxlite::volumes::Volumes;
//!
//! let home = Home::from_env()?;
//! let (box_id, mem_mib) = ("b1", 512);
//! let mut qemu_args = memory_backend_args(mem_mib, true); // once per VM
//!
//! let mut volumes = Volumes::open(&home)?;
//! let lease = volumes.acquire("data", box_id, true)?; // volumes.release_box(box_id) at stop
//! qemu_args.extend(
//!     DiskAttachment {
//!         path: &lease.path,
//!         format: lease.format(),
//!         id: "vol0",
//!         serial: &lease.serial,
//!         read_only: !lease.read_write,
//!     }
//!     .qemu_args(BlockTransport::Pci),
//! );
//! let volume_mount = lease.mount_spec("/data"); // goes into GuestSetup.mounts
//!
//! let staging = home.box_dir(box_id).join("shares/0");
//! let plan = plan_share(std::path::Path::new("/srv/www"), true, &staging)?;
//! let socket = home.box_dir(box_id).join("fs0.sock");
//! let daemon = Virtiofsd::spawn(&plan, &ShareOptions::new("fs0", &socket))?; // keep it alive
//! qemu_args.extend(daemon.qemu_args(0, Transport::Pci));
//! // GuestSetup.mounts: MountSpec { source: Virtiofs { tag: "fs0" }, target: "/www",
//! //                                readonly: true, file: plan.file }
//! # let _ = (volume_mount, qemu_args);
//! # Ok(())
//! # }
//! ```

pub mod name;
pub mod store;
pub mod virtiofs;

pub use name::validate_volume_name;
pub use store::{Lease, Volume, VolumeError, Volumes, DEFAULT_VOLUME_SIZE};
