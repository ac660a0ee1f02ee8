//! Volumes: named QCOW2 volumes (thin, persistent, snapshots, backing volumes) and host directory
//! shares over virtiofs.
//!
//! - [`name`]: which volume names are accepted.
//! - [`store`]: [`Volumes`], the named volumes, their snapshots and the leases Boxes hold.
//! - [`virtiofs`]: one `virtiofsd` per host-directory share, and the QEMU arguments for it.

pub mod name;
pub mod store;
pub mod virtiofs;

pub use name::validate_volume_name;
pub use store::{Lease, Volume, VolumeError, Volumes, DEFAULT_VOLUME_SIZE};
