//! The VM engine: boots a Box's guest kernel with its disks, NIC, shares and the agent port.
//!
//! QEMU is the engine we drive today ([`qemu::QemuEngine`]); everything above this module talks to
//! the [`Engine`] trait so another VMM can follow. [`accel`] decides between KVM and TCG and
//! [`assets`] finds the guest kernel and initramfs.

pub mod accel;
pub mod assets;
pub mod qemu;

use std::fmt::Debug;
use std::path::PathBuf;
use std::process::Child;

pub use accel::Accel;
pub use assets::GuestAssets;

/// Errors of the VM engine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The guest kernel or initramfs is missing.
    #[error("guest assets not found: {0} (build them with scripts/build-assets.sh or set BOXLITE_ASSETS)")]
    AssetsMissing(String),
    /// The VMM binary could not be started.
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// `--accel kvm` was asked for where KVM cannot run a guest.
    #[error("KVM is not usable here: {0}")]
    KvmUnusable(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// One block device for the guest, found there by `serial`.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// `qcow2` or `raw`: always explicit, never probed.
    pub format: String,
    pub serial: String,
    pub readonly: bool,
}

/// The guest NIC: QEMU connects to the backend's unix socket (stream framing).
#[derive(Debug, Clone)]
pub struct NicSpec {
    pub socket: PathBuf,
    pub mac: String,
}

/// A vhost-user-fs share served by a virtiofsd listening on `socket`.
#[derive(Debug, Clone)]
pub struct FsShareSpec {
    pub socket: PathBuf,
    pub tag: String,
}

/// Everything needed to boot one guest.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub assets: GuestAssets,
    /// Extra kernel command line words after the defaults.
    pub extra_cmdline: Vec<String>,
    /// The guest's serial console is appended here.
    pub console_log: PathBuf,
    /// The VMM's own stderr goes here; `None` leaves it piped for the caller to read.
    pub vmm_log: Option<PathBuf>,
    /// QEMU listens here for the agent's virtio-serial port; `None` boots without one (probes).
    pub agent_socket: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    pub nic: Option<NicSpec>,
    pub shares: Vec<FsShareSpec>,
}

/// A VM engine.
pub trait Engine: Send + Sync + Debug {
    /// Short name for logs and `inspect` (`qemu`).
    fn name(&self) -> &'static str;
    /// Starts the guest; the child is the VMM process, which exits when the guest powers off.
    fn spawn(&self, spec: &VmSpec) -> Result<Child, VmmError>;
}
