//! boxlite runs OCI container images inside lightweight virtual machines ("Boxes").
//!
//! The library is the product; the `boxlite` CLI is a thin layer over it. A [`Runtime`] owns a
//! home folder (images, Boxes, volumes and their state); a Box is created from an image, started
//! (a shim process boots a QEMU guest whose agent assembles the image's root filesystem), and
//! commands run in it through [`LiteBox::exec`].
//!
//! Module map, one concern each:
//! - [`images`]: registry pulls, the blob store, layer extraction and rootfs assembly.
//! - [`rootfs`]: shared read-only base disks and per-Box copy-on-write overlays.
//! - [`volumes`]: named QCOW2 volumes and host directory shares.
//! - [`vmm`]: the VM engine (QEMU, KVM or TCG), kernel and initramfs assets.
//! - [`net`]: network backends (usernet, libslirp, passt, none).
//! - [`runtime`]: the home folder, the state database and Box lifecycle.
//! - [`litebox`]: the handle to one Box and its exec sessions.
//! - [`shim`]: the per-Box process that owns the VM while it runs.

pub mod home;
pub mod images;
pub mod litebox;
pub mod net;
pub mod rootfs;
pub mod runtime;
pub mod shim;
pub mod state;
pub mod vmm;
pub mod volumes;
