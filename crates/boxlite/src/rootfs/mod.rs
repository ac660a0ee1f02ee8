//! Root filesystems and Box disks: shared read-only base images built from an image's layers, and
//! per-Box QCOW2 overlays over them (qcow2 spec: backing files with an explicit format).
//!
//! - [`qemu_img`]: running `qemu-img`/`qemu-io` and parsing their JSON.
//! - [`chain`]: walking a backing chain safely (loops, depth, unrecorded formats).
//! - [`qcow2`]: overlays, checks, growth, internal snapshots, flattening.
//! - [`size`]: human sizes (`512M`, `10G`).

pub mod chain;
pub mod qcow2;
pub mod qemu_img;
pub mod size;

pub use qemu_img::ImageFormat;
