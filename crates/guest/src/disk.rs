//! Block devices of the Box: found by their virtio-blk serial, checked for a filesystem, formatted
//! with the bundled mke2fs when fresh, and grown online to fill the device.
//!
//! The serial is what the host set with `-device virtio-blk-pci,serial=…`; Linux shows it in
//! `/sys/block/vdX/serial`. Formatting only ever happens on a device whose first 64 KiB are all
//! zero (a fresh thin volume); a device with unknown data is refused, never overwritten.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::reaper::{ExitStatus, Reaper};
use crate::spawn::{self, Ids, ProcessSpec};

/// Where `scripts/build-assets.sh` puts mke2fs, its libraries and its loader in the initramfs.
const MKE2FS_DIR: &str = "/boxlite";

/// Errors about one block device.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no virtio-blk disk with serial {serial:?} (disks seen: {seen:?})")]
    NotFound { serial: String, seen: Vec<String> },
    #[error("cannot read {device} (serial {serial:?})")]
    Read {
        device: PathBuf,
        serial: String,
        #[source]
        source: io::Error,
    },
    #[error("disk {serial:?} ({device}) holds data but no filesystem boxlite recognizes; not formatting it")]
    UnknownContent { device: PathBuf, serial: String },
    #[error("cannot format disk {serial:?} as {fstype}: only ext2/ext3/ext4 are supported")]
    UnsupportedFormat { serial: String, fstype: String },
    #[error("mke2fs on disk {serial:?} ({device}) failed: {reason}")]
    Format {
        device: PathBuf,
        serial: String,
        reason: String,
    },
    #[error("growing the filesystem on {device} to {blocks} blocks failed")]
    Grow {
        device: PathBuf,
        blocks: u64,
        #[source]
        source: io::Error,
    },
}

/// How long to wait for a disk to show up: virtio-blk probes its devices while its module loads,
/// before the agent serves the host, so a disk that is not there by then is not coming.
pub const DISK_WAIT: Duration = Duration::from_secs(2);

/// Finds `/dev/vdX` for the disk with `serial`, waiting up to `timeout` for it to appear.
pub fn find_by_serial(serial: &str, timeout: Duration) -> Result<PathBuf, DiskError> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("vd") {
                    continue;
                }
                let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
                let found = found.trim().to_string();
                if serial_matches(serial, &found) {
                    return Ok(PathBuf::from("/dev").join(&name));
                }
                seen.push(format!("{name}={found}"));
            }
        }
        if Instant::now() >= deadline {
            seen.sort();
            return Err(DiskError::NotFound {
                serial: serial.to_string(),
                seen,
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// virtio-blk carries at most this many bytes of a serial; QEMU cuts longer ones.
const SERIAL_BYTES: usize = 20;

/// Whether the serial the guest sees (`found`) is the one the host set (`wanted`), which may have
/// been cut to [`SERIAL_BYTES`] on the way.
fn serial_matches(wanted: &str, found: &str) -> bool {
    let wanted = wanted.as_bytes();
    !found.is_empty() && found.as_bytes() == &wanted[..wanted.len().min(SERIAL_BYTES)]
}

/// What the start of a device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// A filesystem of this kind.
    Filesystem(&'static str),
    /// Only zeros: a fresh device.
    Empty,
    /// Something else.
    Unknown,
}

/// Looks at the first 64 KiB of `device` for a filesystem signature.
pub fn probe(device: &Path, serial: &str) -> Result<Content, DiskError> {
    let read_err = |source| DiskError::Read {
        device: device.to_path_buf(),
        serial: serial.to_string(),
        source,
    };
    let mut head = vec![0u8; 64 * 1024 + 4096];
    let mut file = File::open(device).map_err(read_err)?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(read_err)? {
            0 => break,
            n => got += n,
        }
    }
    head.truncate(got);
    Ok(classify(&head))
}

fn classify(head: &[u8]) -> Content {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xef]) {
        return Content::Filesystem("ext");
    }
    if at(1024, &[0xe2, 0xe1, 0xf5, 0xe0]) {
        return Content::Filesystem("erofs");
    }
    if at(0, b"XFSB") {
        return Content::Filesystem("xfs");
    }
    if at(65600, b"_BHRfS_M") {
        return Content::Filesystem("btrfs");
    }
    if head.iter().take(64 * 1024).all(|&b| b == 0) {
        return Content::Empty;
    }
    Content::Unknown
}

/// Formats `device` unless it already holds a filesystem; refuses unknown content.
pub fn format_if_empty(
    device: &Path,
    serial: &str,
    fstype: &str,
    reaper: &Reaper,
) -> Result<bool, DiskError> {
    match probe(device, serial)? {
        Content::Filesystem(_) => return Ok(false),
        Content::Unknown => {
            return Err(DiskError::UnknownContent {
                device: device.to_path_buf(),
                serial: serial.to_string(),
            })
        }
        Content::Empty => {}
    }
    if !matches!(fstype, "ext2" | "ext3" | "ext4") {
        return Err(DiskError::UnsupportedFormat {
            serial: serial.to_string(),
            fstype: fstype.to_string(),
        });
    }
    let format_err = |reason: String| DiskError::Format {
        device: device.to_path_buf(),
        serial: serial.to_string(),
        reason,
    };
    let dir = Path::new(MKE2FS_DIR);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mke2fs arguments");
    let loader = dir.join("lib/ld-linux-x86-64.so.2");
    let argv = [
        loader.to_string_lossy().into_owned(),
        "--library-path".into(),
        dir.join("lib").to_string_lossy().into_owned(),
        dir.join("mke2fs").to_string_lossy().into_owned(),
        "-q".into(),
        "-F".into(),
        "-t".into(),
        fstype.into(),
        "-E".into(),
        "lazy_itable_init=1,lazy_journal_init=1".into(),
        device.to_string_lossy().into_owned(),
    ];
    let console = 2;
    let null = spawn::dev_null().map_err(|e| format_err(format!("open /dev/null: {e}")))?;
    let spec = ProcessSpec {
        path: c(&argv[0]),
        argv: argv.iter().map(|a| c(a)).collect(),
        env: vec![c(&format!("MKE2FS_CONFIG={MKE2FS_DIR}/mke2fs.conf"))],
        cwd: c("/"),
        ids: Ids {
            uid: 0,
            gid: 0,
            groups: vec![0],
        },
        stdio: [null.as_raw_fd(), console, console],
        controlling_tty: false,
    };
    let (_, exit) = reaper
        .spawn_with(|| spawn::spawn(&spec))
        .map_err(|e| format_err(e.to_string()))?;
    match exit.recv() {
        Ok(ExitStatus::Code(0)) => Ok(true),
        Ok(status) => Err(format_err(format!(
            "exit status {} (its messages are on the console)",
            status.shell_code()
        ))),
        Err(_) => Err(format_err("the reaper stopped".into())),
    }
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// Grows the ext4 filesystem mounted at `mount_point` to fill `device` (online resize); returns
/// the filesystem's size in blocks. A filesystem that already fills its device is left as is.
pub fn grow(device: &Path, mount_point: &Path) -> Result<u64, DiskError> {
    let grow_err = |blocks, source| DiskError::Grow {
        device: device.to_path_buf(),
        blocks,
        source,
    };
    let dev = File::open(device).map_err(|e| grow_err(0, e))?;
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through a valid pointer.
    unsafe { blk_get_size64(dev.as_raw_fd(), &mut bytes) }.map_err(|e| grow_err(0, e.into()))?;
    let stat = nix::sys::statfs::statfs(mount_point).map_err(|e| grow_err(0, e.into()))?;
    let block_size = stat.block_size() as u64;
    let blocks = bytes / block_size;
    let root = File::open(mount_point).map_err(|e| grow_err(blocks, e))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through a valid pointer.
    unsafe { ext4_resize_fs(root.as_raw_fd(), &blocks) }.map_err(|e| grow_err(blocks, e.into()))?;
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_match_exactly_or_as_virtio_cuts_them() {
        assert!(serial_matches("root", "root"));
        assert!(!serial_matches("root", "root2"));
        assert!(!serial_matches("", ""));
        assert!(serial_matches(
            "vol-0123456789abcdefXYZ",
            "vol-0123456789abcdef"
        ));
        assert!(!serial_matches(
            "vol-0123456789abcdefXYZ",
            "vol-0123456789abcde"
        ));
    }

    #[test]
    fn signatures_zeros_and_junk_are_told_apart() {
        let mut head = vec![0u8; 70 * 1024];
        assert_eq!(classify(&head), Content::Empty);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(classify(&head), Content::Filesystem("ext"));
        let mut junk = vec![0u8; 70 * 1024];
        junk[5000] = 1;
        assert_eq!(
            classify(&junk),
            Content::Unknown,
            "data is never formatted over"
        );
    }
}
