//! Root filesystems and Box disks: shared read-only base images built from an image's layers, and
//! per-Box QCOW2 overlays over them (qcow2 spec: backing files with an explicit format).
//!
//! - [`qemu_img`]: running `qemu-img`/`qemu-io` and parsing their JSON.
//! - [`chain`]: walking a backing chain safely (loops, depth, unrecorded formats).
//! - [`qcow2`]: overlays, checks, growth, internal snapshots, flattening.
//! - [`base`]: the shared read-only base disk of an image (ext4, raw).
//! - [`disk`]: the disk of one Box: overlay, snapshots, clone.
//! - [`gc`]: unreferenced base disks and layers, space usage.
//! - [`size`]: human sizes (`512M`, `10G`).

pub mod base;
pub mod chain;
pub mod disk;
pub mod gc;
pub mod qcow2;
pub mod qemu_img;
pub mod size;

pub use base::{ensure_base, BaseDisk};
pub use disk::{BoxDisk, DEFAULT_DISK_SIZE};
pub use qemu_img::ImageFormat;
