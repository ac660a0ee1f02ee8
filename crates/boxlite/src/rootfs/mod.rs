//! Root filesystems and Box disks: shared read-only base images built from an image's layers, and
//! per-Box QCOW2 overlays over them (qcow2 spec: backing files with an explicit format).
//!
//! - [`qemu_img`]: running `qemu-img`/`qemu-io` and parsing their JSON.
//! - [`chain`]: walking a backing chain safely (loops, depth, unrecorded formats).
//! - [`qcow2`]: overlays, checks, growth, internal snapshots, flattening.
//! - [`attach`]: QEMU arguments for a disk, format always explicit.
//! - [`base`]: the shared read-only base disk of an image (ext4, raw).
//! - [`disk`]: the disk of one Box: overlay, snapshots, clone.
//! - [`gc`]: unreferenced base disks and layers, space usage.
//! - [`size`]: human sizes (`512M`, `10G`).
//!
//! How the runtime uses it:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use boxlite::home::Home;
//! use boxlite::rootfs::attach::{BlockTransport, DiskAttachment};
//! use boxlite::rootfs::{ensure_base, BoxDisk, ImageFormat};
//!
//! let home = Home::from_env()?;
//! # let (image_id, assembled_rootfs, box_id) = ("0123abcd", std::path::Path::new("/x"), "b1");
//! // Once per image (later calls return the existing file at once).
//! let base = ensure_base(&home, image_id, assembled_rootfs)?;
//! // Once per Box, at create time (`--disk-size`, default 10 GiB).
//! BoxDisk::create(&home, box_id, &base.path, base.format, None)?;
//! // At every start.
//! let disk = BoxDisk::open(&home, box_id)?;
//! disk.prepare_boot()?;
//! let qemu_args = DiskAttachment {
//!     path: disk.path(),
//!     format: ImageFormat::Qcow2,
//!     id: "root",
//!     serial: "root",
//!     read_only: false,
//! }
//! .qemu_args(BlockTransport::Pci);
//! # let _ = qemu_args;
//! # Ok(())
//! # }
//! ```

pub mod attach;
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
