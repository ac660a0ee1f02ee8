//! QEMU arguments that attach a disk image as a virtio-blk device, with the image format always
//! stated (`format=`), never probed: a raw disk a guest filled with a qcow2 header stays raw
//! (shared case 34). The guest finds the device by its serial (`/sys/block/vdX/serial`).

use std::path::Path;

use crate::rootfs::qemu_img::ImageFormat;

/// Longest serial virtio-blk reports to the guest.
pub const MAX_SERIAL: usize = 20;

/// One disk to attach.
#[derive(Debug, Clone)]
pub struct DiskAttachment<'a> {
    pub path: &'a Path,
    pub format: ImageFormat,
    /// `-drive` id, unique per VM.
    pub id: &'a str,
    /// Serial the guest sees (at most [`MAX_SERIAL`] bytes of `[A-Za-z0-9_-]`).
    pub serial: &'a str,
    pub read_only: bool,
}

/// How QEMU exposes the block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockTransport {
    /// `virtio-blk-pci` (pc, q35).
    Pci,
    /// `virtio-blk-device` on virtio-mmio (microvm).
    Mmio,
}

impl DiskAttachment<'_> {
    /// `-drive …,format=F,if=none,id=… -device virtio-blk-…,drive=…,serial=…`.
    ///
    /// Panics on a serial or id outside `[A-Za-z0-9_-]` or a serial over 20 bytes: both come
    /// from boxlite itself, never from users.
    pub fn qemu_args(&self, transport: BlockTransport) -> Vec<String> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        };
        assert!(
            valid(self.serial) && self.serial.len() <= MAX_SERIAL,
            "bad serial"
        );
        assert!(valid(self.id), "bad drive id");
        let mut drive = format!(
            "file={},format={},if=none,id={},cache=writeback,discard=unmap",
            self.path.to_string_lossy().replace(',', ",,"),
            self.format.as_str(),
            self.id
        );
        if self.read_only {
            drive.push_str(",read-only=on");
        }
        let device = match transport {
            BlockTransport::Pci => "virtio-blk-pci",
            BlockTransport::Mmio => "virtio-blk-device",
        };
        vec![
            "-drive".into(),
            drive,
            "-device".into(),
            format!("{device},drive={},serial={}", self.id, self.serial),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_always_explicit() {
        let args = DiskAttachment {
            path: Path::new("/h/boxes/a,b/disk.qcow2"),
            format: ImageFormat::Qcow2,
            id: "root",
            serial: "root",
            read_only: false,
        }
        .qemu_args(BlockTransport::Pci);
        assert_eq!(
            args,
            [
                "-drive",
                "file=/h/boxes/a,,b/disk.qcow2,format=qcow2,if=none,id=root,cache=writeback,discard=unmap",
                "-device",
                "virtio-blk-pci,drive=root,serial=root"
            ]
        );
    }
}
