//! The read-only base disk of an image: the assembled rootfs directory turned into a raw ext4
//! filesystem image, built once per image under `images/rootfs/<image id>.raw` and shared by
//! every Box of that image as the backing file of its qcow2 overlay.
//!
//! `mke2fs -t ext4 -d DIR` (e2fsprogs) copies the tree with its ownership, modes, timestamps,
//! extended attributes (`security.capability` included), device nodes, FIFOs, sockets, symlinks
//! and hard links; the only things it does not carry are the attributes of the tree's root
//! folder, which we set afterwards with `debugfs`, and the `lost+found` it adds, which we remove
//! unless the tree had one. ext4 raw is the format because the Box root must be writable through
//! the overlay and grow online (`resize2fs` in the guest); EROFS, though smaller, is read-only.
//!
//! Known shortcoming: `mke2fs -d` (e2fsprogs 1.47.0, and 1.47.2 alike) inserts each entry by
//! scanning its folder, so a folder of n entries costs O(n²): 10 000 files in one folder take
//! ~14 s here against 0.8 s for the same files spread over 100 folders. Most images build in
//! seconds; a tree with huge folders builds slowly (once per image) until the tool improves or
//! the base is built another way (e.g. writing into a mounted filesystem where that is allowed).
//!
//! Builds are atomic (made under `tmp/`, renamed into place) and concurrent-safe: an exclusive
//! lock on `images/rootfs/<id>.lock` makes two creators build once; the second finds the file.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

use crate::home::Home;
use crate::rootfs::qemu_img::ImageFormat;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Smallest base filesystem; below this ext4 metadata dominates.
const MIN_SIZE: u64 = 64 * MIB;
/// Free space on top of the tree in the base itself (the Box overlay adds much more, and the
/// guest grows the filesystem online to the overlay's size).
const HEADROOM: u64 = 32 * MIB;
/// At least one inode per this many bytes, so a filesystem grown online (groups keep the base's
/// inodes-per-group) still has room for many small files.
const BYTES_PER_INODE: u64 = 16 * 1024;

/// A failure to build a base disk.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The image id cannot name a file.
    #[error("invalid image id {0:?} for a base disk (expected letters, digits, '.', '_', '-')")]
    InvalidImageId(String),
    /// The rootfs to build from is not a folder.
    #[error("rootfs {path} is not a folder")]
    NotADirectory { path: PathBuf },
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `mke2fs` or `debugfs` failed.
    #[error("`{command}` failed building the base disk of image {image_id} ({status}): {stderr}")]
    Tool {
        image_id: String,
        command: String,
        status: String,
        stderr: String,
    },
}

type Result<T> = std::result::Result<T, BaseError>;

/// A built base disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDisk {
    /// `images/rootfs/<id>.raw`.
    pub path: PathBuf,
    /// Always [`ImageFormat::Raw`] (an ext4 filesystem image); record it in every overlay.
    pub format: ImageFormat,
    /// Length of the file: the base filesystem's size.
    pub size: u64,
    /// Whether this call built it (false: it was there already).
    pub built: bool,
}

/// What a rootfs tree needs: counted without following symlinks, hard links once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Inodes (files, folders, links, nodes), hard-linked files once.
    pub inodes: u64,
    /// Blocks of 4 KiB for file data, folders, long symlinks and large xattrs.
    pub blocks: u64,
    /// Bytes of regular-file content.
    pub file_bytes: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BaseError + 'a {
    move |source| BaseError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks an image id and returns the file stem for it (`sha256:` prefixes dropped).
fn file_stem(image_id: &str) -> Result<&str> {
    let stem = image_id.strip_prefix("sha256:").unwrap_or(image_id);
    let ok = !stem.is_empty()
        && stem.len() <= 128
        && !stem.starts_with('.')
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(stem)
    } else {
        Err(BaseError::InvalidImageId(image_id.to_string()))
    }
}

/// Where the base disk of `image_id` lives (whether or not it was built).
pub fn base_path(home: &Home, image_id: &str) -> Result<PathBuf> {
    Ok(home
        .rootfs_dir()
        .join(format!("{}.raw", file_stem(image_id)?)))
}

/// The base disk of `image_id` if it was built already.
pub fn existing_base(home: &Home, image_id: &str) -> Result<Option<BaseDisk>> {
    let path = base_path(home, image_id)?;
    Ok(std::fs::metadata(&path).ok().map(|meta| BaseDisk {
        path,
        format: ImageFormat::Raw,
        size: meta.len(),
        built: false,
    }))
}

/// Returns the base disk of `image_id`, building it from `rootfs` if it does not exist yet.
///
/// Safe to call from several threads or processes at once: one builds, the others wait for the
/// lock and find the finished file. A crash mid-build leaves only a file under `tmp/`.
pub fn ensure_base(home: &Home, image_id: &str, rootfs: &Path) -> Result<BaseDisk> {
    let stem = file_stem(image_id)?;
    let path = home.rootfs_dir().join(format!("{stem}.raw"));
    let lock_path = home.rootfs_dir().join(format!("{stem}.lock"));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("open lock", &lock_path))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("lock", &lock_path)(errno.into()))?;

    if let Ok(meta) = std::fs::metadata(&path) {
        return Ok(BaseDisk {
            path,
            format: ImageFormat::Raw,
            size: meta.len(),
            built: false,
        });
    }

    remove_stale_builds(home, stem);
    let started = Instant::now();
    let tmp = home
        .tmp_dir()
        .join(format!("rootfs-{stem}-{}.raw", std::process::id()));
    let _cleanup = RemoveOnDrop(tmp.clone());
    let size = build_ext4(image_id, rootfs, &tmp)?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("publish", &path))?;
    if let Ok(dir) = File::open(home.rootfs_dir()) {
        let _ = dir.sync_all();
    }
    tracing::info!(
        image_id,
        path = %path.display(),
        size_mib = size / MIB,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built base disk"
    );
    Ok(BaseDisk {
        path,
        format: ImageFormat::Raw,
        size,
        built: true,
    })
}

/// Removes what a builder of this image that crashed left under `tmp/` (we hold the image's
/// lock, so no other builder of it is running).
fn remove_stale_builds(home: &Home, stem: &str) {
    let prefix = format!("rootfs-{stem}-");
    let Ok(entries) = std::fs::read_dir(home.tmp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            tracing::debug!(file = %name, "removing a stale base disk build");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Measures what `root` needs on ext4 with 4 KiB blocks and 256-byte inodes.
pub fn measure_tree(root: &Path) -> Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut seen_links: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        usage.inodes += 1;
        let mut entry_bytes = 24u64; // "." and ".."
        for entry in std::fs::read_dir(&dir).map_err(io_err("read folder", &dir))? {
            let entry = entry.map_err(io_err("read folder", &dir))?;
            let path = entry.path();
            entry_bytes += 8 + (entry.file_name().len() as u64).div_ceil(4) * 4;
            let m = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            if m.is_dir() {
                stack.push(path);
                continue;
            }
            if m.nlink() > 1 && !seen_links.insert((m.dev(), m.ino())) {
                continue;
            }
            usage.inodes += 1;
            if m.is_file() {
                usage.file_bytes += m.len();
                // Data plus one extent block per 128 MiB for large, fragmented files.
                usage.blocks += m.len().div_ceil(BLOCK) + m.len() / (128 * MIB);
            } else if m.file_type().is_symlink() && m.len() > 59 {
                usage.blocks += 1;
            }
            if xattr_bytes(&path) > 96 {
                usage.blocks += 1;
            }
        }
        usage.blocks += entry_bytes.div_ceil(BLOCK).max(1);
    }
    Ok(usage)
}

/// Total bytes of a file's extended attribute names and values (0 when it has none).
fn xattr_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: `c` is a NUL-terminated path; a null buffer with size 0 asks only for the length.
    let names = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if names <= 0 {
        return 0;
    }
    // Names plus a generous estimate of values (capabilities are 20 bytes, ACLs small).
    names as u64 * 4
}

/// The filesystem size and inode count for a tree.
pub fn plan_size(usage: &TreeUsage) -> (u64, u64) {
    let data = usage.blocks * BLOCK;
    let inode_tables = usage.inodes * 256;
    let size = (data + data / 8 + inode_tables * 2 + HEADROOM).max(MIN_SIZE);
    let size = size.div_ceil(MIB) * MIB;
    let inodes = (usage.inodes + usage.inodes / 4 + 1024).max(size / BYTES_PER_INODE);
    (size, inodes)
}

/// Makes an ext4 image of `rootfs` at `out`; returns its size.
fn build_ext4(image_id: &str, rootfs: &Path, out: &Path) -> Result<u64> {
    let root_meta = std::fs::metadata(rootfs).map_err(io_err("stat", rootfs))?;
    if !root_meta.is_dir() {
        return Err(BaseError::NotADirectory {
            path: rootfs.to_path_buf(),
        });
    }
    let usage = measure_tree(rootfs)?;
    let (size, inodes) = plan_size(&usage);
    tracing::info!(
        image_id,
        files = usage.inodes,
        content_mib = usage.file_bytes >> 20,
        size_mib = size >> 20,
        "building base disk (once per image)"
    );

    let file = File::create(out).map_err(io_err("create", out))?;
    file.set_len(size).map_err(io_err("size", out))?;
    drop(file);
    let inodes_arg = inodes.to_string();
    run_tool(
        image_id,
        "mke2fs",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-t".as_ref(),
            "ext4".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-I".as_ref(),
            "256".as_ref(),
            "-N".as_ref(),
            inodes_arg.as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-L".as_ref(),
            "boxlite-root".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=0,nodiscard".as_ref(),
            "-d".as_ref(),
            rootfs.as_os_str(),
            out.as_os_str(),
        ],
    )?;
    fix_root_folder(image_id, rootfs, &root_meta, out)?;
    Ok(size)
}

/// Gives the filesystem's root folder the owner, mode and mtime of the tree's root (mke2fs -d
/// leaves root 0755 root:root) and removes the `lost+found` the tree did not have.
fn fix_root_folder(
    image_id: &str,
    rootfs: &Path,
    meta: &std::fs::Metadata,
    out: &Path,
) -> Result<()> {
    let mut script = format!(
        "sif / mode 0{:o}\nsif / uid {}\nsif / gid {}\nsif / mtime @{}\n",
        0o040000 | (meta.permissions().mode() & 0o7777),
        meta.uid(),
        meta.gid(),
        meta.mtime().max(0),
    );
    if std::fs::symlink_metadata(rootfs.join("lost+found")).is_err() {
        script.push_str("rmdir /lost+found\n");
    }
    // Root-folder xattrs are not copied (rare in images); the root gets none.
    let script_path = out.with_extension("debugfs");
    let _cleanup = RemoveOnDrop(script_path.clone());
    File::create(&script_path)
        .and_then(|mut f| f.write_all(script.as_bytes()))
        .map_err(io_err("write", &script_path))?;
    run_tool(
        image_id,
        "debugfs",
        &[
            "-w".as_ref(),
            "-f".as_ref(),
            script_path.as_os_str(),
            out.as_os_str(),
        ],
    )
}

fn run_tool(image_id: &str, program: &str, args: &[&OsStr]) -> Result<()> {
    let command = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err("run", Path::new(program)))?;
    // debugfs reports a failed request on stderr but exits 0.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complained = program == "debugfs"
        && stderr
            .lines()
            .any(|l| !l.starts_with("debugfs ") && !l.trim().is_empty());
    if !output.status.success() || complained {
        return Err(BaseError::Tool {
            image_id: image_id.to_string(),
            command,
            status: output.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_become_safe_file_names() {
        assert_eq!(file_stem("sha256:abc123").unwrap(), "abc123");
        assert_eq!(file_stem("abc-1.2_x").unwrap(), "abc-1.2_x");
        for bad in ["", "../x", "a/b", ".hidden", "sha256:", "a b"] {
            assert!(file_stem(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_leave_room_for_the_tree() {
        let (size, inodes) = plan_size(&TreeUsage {
            inodes: 100_000,
            blocks: 250_000,
            file_bytes: 900 * MIB,
        });
        assert!(size > 250_000 * BLOCK + 100_000 * 256 + HEADROOM);
        assert!(inodes > 100_000 && inodes >= size / BYTES_PER_INODE);
        let (small, _) = plan_size(&TreeUsage::default());
        assert_eq!(small, MIN_SIZE);
    }
}
