//! `ImageStorage`: the layer cache, one extracted layer per diff_id under
//! `images/layers/<diff_id hex>/`, shared by every image that has the layer.
//!
//! ```text
//! images/layers/<hex>/           mode 0700: the cache holds other people's setuid binaries
//!     root/                      the layer's own files (whiteouts are not files)
//!     layer.json                 LayerMeta: whiteouts, opaque dirs, cross-layer hardlinks, ...
//! ```
//!
//! A layer is extracted into a staging directory under `tmp/` while its uncompressed stream is
//! hashed, checked against the image config's diff_id (OCI image spec, "Layer DiffID"), and only
//! then renamed into place in one step: a layer directory exists complete or not at all. When
//! two processes race, the second rename fails and the loser throws its copy away. A layer
//! already present is never extracted again.
//!
//! Known shortcoming: a layer extracted without privileges keeps the extracting user as owner
//! of its files (only the count of lost owners is in `layer.json`; device nodes and refused
//! xattrs are recorded in full and applied by a later privileged assembly). Root reusing that
//! home later gets those owners too; the layer is not re-extracted.
//!
//! The blob's own (compressed) digest is the blob store's to verify; this module checks the
//! uncompressed content against the diff_id.
//!
//! ```no_run
//! use boxlite::home::Home;
//! use boxlite::images::assemble::{assemble, AssembleMode};
//! use boxlite::images::digest::Digest;
//! use boxlite::images::storage::{ImageStorage, LayerBlob, Limits};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let home = Home::from_env()?;
//! let storage = ImageStorage::new(&home);
//! let digest: Digest = "sha256:9a15c322897b58d07ccb26a604a2d9d394ffe6cdb7f8dede294de39c151adb14".parse()?;
//! let diff_id: Digest = "sha256:b48c0048a6d6c926b404f12ea331bdff3b85a9fd063ee187b341bcc88426de57".parse()?;
//! let path = home.blobs_dir().join(digest.hex());
//! let blob = LayerBlob {
//!     path: &path,
//!     media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
//!     digest: &digest,
//! };
//! let info = storage.ensure_layer(&blob, &diff_id, &Limits::default())?;
//! println!("extracted now: {}", info.extracted);
//! // Once every layer of the image is in: the rootfs, bottom layer first.
//! assemble(&storage, &[diff_id], std::path::Path::new("/tmp/rootfs"), AssembleMode::Copy)?;
//! # Ok(()) }
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::home::Home;
use crate::images::archive::{ArchiveError, Compression, LayerStream};
use crate::images::digest::{DiffId, Digest};
use crate::images::layer::{self, fsops, ExtractOptions, LayerError, LayerMeta};

/// Name of the metadata file in a layer directory.
const META_FILE: &str = "layer.json";
/// Name of the tree in a layer directory.
const ROOT_DIR: &str = "root";
/// Prefix of staging directories under `tmp/`.
const STAGING_PREFIX: &str = "layer-";

/// Bounds on what one layer may expand to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most uncompressed bytes (the tar stream) one layer may have; also the most file content
    /// it may expand to (sparse files' holes count).
    pub max_uncompressed_bytes: u64,
    /// Most tar members one layer may have.
    pub max_entries: u64,
}

impl Default for Limits {
    /// 32 GiB and 4 million members: beyond any real image layer, far below what fills a disk.
    fn default() -> Self {
        Limits {
            max_uncompressed_bytes: 32 << 30,
            max_entries: ExtractOptions::default().max_entries,
        }
    }
}

/// A compressed (or plain) layer blob on disk, as the manifest describes it.
#[derive(Debug, Clone, Copy)]
pub struct LayerBlob<'a> {
    /// Where the blob is (normally `images/blobs/sha256/<hex>`).
    pub path: &'a Path,
    /// The manifest's media type for it.
    pub media_type: &'a str,
    /// The blob's (compressed) digest, for messages.
    pub digest: &'a Digest,
}

/// How far an extraction got, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractProgress {
    /// Blob bytes read so far, out of `blob_bytes`.
    pub blob_read: u64,
    pub blob_bytes: u64,
    /// Uncompressed tar bytes so far.
    pub uncompressed: u64,
}

/// A layer in the cache.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    pub diff_id: DiffId,
    /// `images/layers/<hex>`.
    pub dir: PathBuf,
    /// Whether this call extracted it (false: it was already there, or another process won a
    /// race to put it there).
    pub extracted: bool,
    /// Uncompressed tar size, when this call read it.
    pub uncompressed_bytes: Option<u64>,
}

/// Failures of the layer cache.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("cannot extract layer {digest} (diff_id {diff_id})")]
    Extract {
        digest: Digest,
        diff_id: DiffId,
        #[source]
        source: LayerError,
    },
    #[error(
        "layer {digest}: member {member:?} would expand it past the limit of {limit} bytes \
         ({limit_mib} MiB); refusing it (decompression bomb?)"
    )]
    TooLarge {
        digest: Digest,
        member: String,
        limit: u64,
        limit_mib: u64,
    },
    #[error(
        "layer {digest}: its uncompressed content has diff_id {actual}, but the image config \
         says {expected}; refusing it"
    )]
    DiffIdMismatch {
        digest: Digest,
        expected: DiffId,
        actual: DiffId,
    },
    #[error("layer {diff_id} is not in the layer cache")]
    Missing { diff_id: DiffId },
    #[error("layer cache: cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer cache: metadata {path} is unreadable")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path, source }
}

/// The layer cache of one home folder.
#[derive(Debug)]
pub struct ImageStorage {
    layers_dir: PathBuf,
    tmp_dir: PathBuf,
    extractions: AtomicU64,
}

impl ImageStorage {
    pub fn new(home: &Home) -> ImageStorage {
        ImageStorage {
            layers_dir: home.layers_dir(),
            tmp_dir: home.tmp_dir(),
            extractions: AtomicU64::new(0),
        }
    }

    /// `images/layers/<hex>`.
    pub fn layer_dir(&self, diff_id: &DiffId) -> PathBuf {
        self.layers_dir.join(diff_id.hex())
    }

    /// The layer's own files.
    pub fn layer_root(&self, diff_id: &DiffId) -> PathBuf {
        self.layer_dir(diff_id).join(ROOT_DIR)
    }

    /// Whether the layer is in the cache (complete: directories only appear complete).
    pub fn has_layer(&self, diff_id: &DiffId) -> bool {
        self.layer_dir(diff_id).join(META_FILE).is_file()
    }

    /// How many layers this `ImageStorage` extracted and committed so far.
    pub fn extractions(&self) -> u64 {
        self.extractions.load(Ordering::Relaxed)
    }

    /// The layer's side table (whiteouts and the rest).
    pub fn read_meta(&self, diff_id: &DiffId) -> Result<LayerMeta, StorageError> {
        let path = self.layer_dir(diff_id).join(META_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::Missing {
                    diff_id: diff_id.clone(),
                })
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| StorageError::Meta { path, source })
    }

    /// Makes sure the layer with `expected` diff_id is in the cache, extracting `blob` if not.
    ///
    /// The blob is decompressed (by its media type, corrected by its magic bytes), limited to
    /// `limits`, extracted into staging while hashed, checked against `expected`, and renamed
    /// into place. On any error nothing is left behind.
    pub fn ensure_layer(
        &self,
        blob: &LayerBlob<'_>,
        expected: &DiffId,
        limits: &Limits,
    ) -> Result<LayerInfo, StorageError> {
        self.ensure_layer_with_progress(blob, expected, limits, &|_| {})
    }

    /// [`ImageStorage::ensure_layer`], calling `progress` about every 4 MiB of uncompressed
    /// data (and once at the end) while it extracts.
    pub fn ensure_layer_with_progress(
        &self,
        blob: &LayerBlob<'_>,
        expected: &DiffId,
        limits: &Limits,
        progress: &dyn Fn(ExtractProgress),
    ) -> Result<LayerInfo, StorageError> {
        let dir = self.layer_dir(expected);
        if self.has_layer(expected) {
            tracing::debug!(diff_id = %expected, "layer already extracted");
            return Ok(LayerInfo {
                diff_id: expected.clone(),
                dir,
                extracted: false,
                uncompressed_bytes: None,
            });
        }
        let file = File::open(blob.path).map_err(|source| ArchiveError::Read {
            digest: blob.digest.clone(),
            source,
        })?;
        let blob_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.extract_and_commit(
            Box::new(file),
            blob_bytes,
            blob.media_type,
            blob.digest,
            expected,
            limits,
            progress,
        )
    }

    /// [`ImageStorage::ensure_layer`] for a blob that is still arriving: `source` yields its
    /// `blob_bytes` bytes (a [`crate::images::store::TeeReader`] following the download) and
    /// ends only once the blob is verified. The layer is committed only if `source` reached its
    /// end and the tar hashes to `expected`.
    pub fn ensure_layer_streamed(
        &self,
        source: impl Read + Send + Sync + 'static,
        blob_bytes: u64,
        media_type: &str,
        digest: &Digest,
        expected: &DiffId,
        limits: &Limits,
    ) -> Result<LayerInfo, StorageError> {
        if self.has_layer(expected) {
            return Ok(LayerInfo {
                diff_id: expected.clone(),
                dir: self.layer_dir(expected),
                extracted: false,
                uncompressed_bytes: None,
            });
        }
        self.extract_and_commit(
            Box::new(source),
            blob_bytes,
            media_type,
            digest,
            expected,
            limits,
            &|_| {},
        )
    }

    /// Extracts `source` into staging, checks it and renames it into place.
    #[allow(clippy::too_many_arguments)]
    fn extract_and_commit(
        &self,
        source: Box<dyn Read + Send + Sync>,
        blob_bytes: u64,
        media_type: &str,
        digest: &Digest,
        expected: &DiffId,
        limits: &Limits,
        progress: &dyn Fn(ExtractProgress),
    ) -> Result<LayerInfo, StorageError> {
        let dir = self.layer_dir(expected);
        let compression = Compression::from_media_type(media_type)?;
        let staging = Staging::create(&self.tmp_dir, expected)?;
        let size = self.extract_into(
            &staging.path,
            source,
            blob_bytes,
            compression,
            digest,
            expected,
            limits,
            progress,
        )?;

        fs::create_dir_all(&self.layers_dir).map_err(io_err("create", &self.layers_dir))?;
        let committed = staging.commit(&dir)?;
        if committed {
            self.extractions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(diff_id = %expected, %digest, bytes = size, "layer extracted");
        } else {
            tracing::debug!(diff_id = %expected, "another process extracted the layer first");
        }
        Ok(LayerInfo {
            diff_id: expected.clone(),
            dir,
            extracted: committed,
            uncompressed_bytes: Some(size),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn extract_into(
        &self,
        staging: &Path,
        source: Box<dyn Read + Send + Sync>,
        blob_bytes: u64,
        compression: Compression,
        digest: &Digest,
        expected: &DiffId,
        limits: &Limits,
        progress: &dyn Fn(ExtractProgress),
    ) -> Result<u64, StorageError> {
        let blob_read = Arc::new(AtomicU64::new(0));
        let counted = CountingReader {
            inner: source,
            count: Arc::clone(&blob_read),
        };
        let mut stream = LayerStream::open(
            counted,
            compression,
            digest.clone(),
            limits.max_uncompressed_bytes,
        )?;
        let options = ExtractOptions {
            max_entries: limits.max_entries,
            max_content_bytes: limits.max_uncompressed_bytes,
        };
        let root = staging.join(ROOT_DIR);
        let mut reporting = ProgressReader {
            inner: &mut stream,
            blob_read: &blob_read,
            blob_bytes,
            next_report: PROGRESS_STEP,
            progress,
        };
        let extracted = layer::extract_layer(&mut reporting, &root, &options);
        let meta = match extracted {
            Ok(meta) => meta,
            Err(source) => {
                if let Some(limit) = stream.limit_error() {
                    return Err(limit.into());
                }
                if let LayerError::TooLarge { member, limit } = source {
                    return Err(StorageError::TooLarge {
                        digest: digest.clone(),
                        member,
                        limit,
                        limit_mib: limit >> 20,
                    });
                }
                return Err(StorageError::Extract {
                    digest: digest.clone(),
                    diff_id: expected.clone(),
                    source,
                });
            }
        };
        if let Err(source) = stream.drain() {
            return Err(match stream.limit_error() {
                Some(limit) => limit.into(),
                None => ArchiveError::Read {
                    digest: digest.clone(),
                    source,
                }
                .into(),
            });
        }
        progress(ExtractProgress {
            blob_read: blob_read.load(Ordering::Relaxed),
            blob_bytes,
            uncompressed: stream.count(),
        });
        let (actual, size) = stream.finish();
        if &actual != expected {
            return Err(StorageError::DiffIdMismatch {
                digest: digest.clone(),
                expected: expected.clone(),
                actual,
            });
        }

        let meta_path = staging.join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("layer metadata serializes");
        let mut out = File::create(&meta_path).map_err(io_err("create", &meta_path))?;
        out.write_all(&json).map_err(io_err("write", &meta_path))?;
        // One syncfs flushes every file of the layer, far cheaper than an fsync per file.
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&out))
            .map_err(|e| io_err("sync", staging)(fsops::errno_io(e)))?;
        Ok(size)
    }

    /// Removes a layer from the cache (moved aside first, so it never looks half-present).
    /// The caller makes sure no image still using it is being assembled; trees already
    /// assembled in `Link` mode keep their inodes.
    pub fn remove_layer(&self, diff_id: &DiffId) -> Result<(), StorageError> {
        let dir = self.layer_dir(diff_id);
        let aside = self
            .tmp_dir
            .join(format!("removing-{}-{}", diff_id.hex(), unique()));
        match fs::rename(&dir, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("move aside", &dir)(e)),
        }
        fsops::remove_tree(&aside).map_err(io_err("remove", &aside))
    }

    /// The diff_ids of every layer in the cache.
    pub fn list_layers(&self) -> Result<Vec<DiffId>, StorageError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.layers_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("list", &self.layers_dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.layers_dir))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            {
                if self.has_layer(&d) {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes staging directories left by processes that died mid-extraction.
    pub fn clean_stale_staging(&self) -> Result<usize, StorageError> {
        let mut removed = 0;
        let entries = match fs::read_dir(&self.tmp_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list", &self.tmp_dir)(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else {
                continue;
            };
            // layer-<hex>-<pid>-<unique>
            let pid = rest.split('-').nth(1).and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                fsops::remove_tree(&entry.path()).map_err(io_err("remove", &entry.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Uncompressed bytes between progress reports.
const PROGRESS_STEP: u64 = 4 << 20;

/// Counts the bytes read from the blob.
struct CountingReader {
    inner: Box<dyn Read + Send + Sync>,
    count: Arc<AtomicU64>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Calls the progress callback as the uncompressed stream goes by.
struct ProgressReader<'a> {
    inner: &'a mut LayerStream,
    blob_read: &'a AtomicU64,
    blob_bytes: u64,
    next_report: u64,
    progress: &'a dyn Fn(ExtractProgress),
}

impl Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let uncompressed = self.inner.count();
        if uncompressed >= self.next_report {
            self.next_report = uncompressed + PROGRESS_STEP;
            (self.progress)(ExtractProgress {
                blob_read: self.blob_read.load(Ordering::Relaxed),
                blob_bytes: self.blob_bytes,
                uncompressed,
            });
        }
        Ok(n)
    }
}

/// A staging directory that removes itself unless committed.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Staging {
    fn create(tmp_dir: &Path, diff_id: &DiffId) -> Result<Staging, StorageError> {
        fs::create_dir_all(tmp_dir).map_err(io_err("create", tmp_dir))?;
        let path = tmp_dir.join(format!(
            "{STAGING_PREFIX}{}-{}-{}",
            diff_id.hex(),
            std::process::id(),
            unique()
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err("create", &path))?;
        let staging = Staging { path, done: false };
        let root = staging.path.join(ROOT_DIR);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(io_err("create", &root))?;
        Ok(staging)
    }

    /// Renames the staging directory to `dest`. `Ok(false)`: `dest` already exists complete
    /// (another process won); the staging copy is discarded.
    fn commit(mut self, dest: &Path) -> Result<bool, StorageError> {
        for _ in 0..2 {
            match nix::fcntl::renameat2(
                None,
                &self.path,
                None,
                dest,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    self.done = true;
                    if let Some(parent) = dest.parent() {
                        fsops::sync_dir(parent).map_err(io_err("sync", parent))?;
                    }
                    return Ok(true);
                }
                Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
                    if dest.join(META_FILE).is_file() {
                        return Ok(false);
                    }
                    // A directory without metadata is nobody's finished work (a manual copy,
                    // an interrupted removal): clear it and try once more.
                    tracing::warn!(path = %dest.display(), "removing an incomplete layer directory");
                    fsops::remove_tree(dest).map_err(io_err("remove", dest))?;
                }
                Err(nix::errno::Errno::EINVAL) => {
                    // No RENAME_NOREPLACE here (some network filesystems): a plain rename
                    // still refuses a non-empty destination, and a complete layer never is.
                    match fs::rename(&self.path, dest) {
                        Ok(()) => {
                            self.done = true;
                            return Ok(true);
                        }
                        Err(_) if dest.join(META_FILE).is_file() => return Ok(false),
                        Err(e) => return Err(io_err("commit", dest)(e)),
                    }
                }
                Err(e) => return Err(io_err("commit", dest)(fsops::errno_io(e))),
            }
        }
        Err(io_err("commit", dest)(io::Error::from(
            io::ErrorKind::AlreadyExists,
        )))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fsops::remove_tree(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staging directory");
            }
        }
    }
}

fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

// Public types cross threads (the pull pipeline extracts on workers).
const _: () = {
    fn check<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn all() {
        check::<ImageStorage>();
        check::<LayerInfo>();
        check::<StorageError>();
        check::<Limits>();
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with_one_file() -> Vec<u8> {
        let mut header = tar::Header::new_ustar();
        header.set_path("hello").unwrap();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(b"hi\n");
        out.resize(out.len() + 509 + 1024, 0);
        out
    }

    #[test]
    fn stale_staging_from_dead_processes_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path()).unwrap();
        let storage = ImageStorage::new(&home);
        let hex = "0".repeat(64);
        let dead = home.tmp_dir().join(format!("layer-{hex}-999999999-1"));
        let alive = home
            .tmp_dir()
            .join(format!("layer-{hex}-{}-1", std::process::id()));
        let other = home.tmp_dir().join("something-else");
        for d in [&dead, &alive, &other] {
            fs::create_dir_all(d.join("root/x")).unwrap();
        }
        assert_eq!(storage.clean_stale_staging().unwrap(), 1);
        assert!(!dead.exists() && alive.exists() && other.exists());
    }

    #[test]
    fn an_incomplete_layer_directory_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path()).unwrap();
        let storage = ImageStorage::new(&home);
        let tar = tar_with_one_file();
        let diff_id = Digest::of(&tar);
        // Left by something that is not us (no layer.json): not a layer.
        fs::create_dir_all(storage.layer_root(&diff_id).join("junk")).unwrap();
        assert!(!storage.has_layer(&diff_id));
        let path = tmp.path().join("blob");
        fs::write(&path, &tar).unwrap();
        let blob = LayerBlob {
            path: &path,
            media_type: "application/vnd.oci.image.layer.v1.tar",
            digest: &diff_id,
        };
        let info = storage
            .ensure_layer(&blob, &diff_id, &Limits::default())
            .unwrap();
        assert!(info.extracted);
        assert!(storage.layer_root(&diff_id).join("hello").is_file());
        assert!(!storage.layer_root(&diff_id).join("junk").exists());
        assert_eq!(
            storage.list_layers().unwrap(),
            std::slice::from_ref(&diff_id)
        );

        storage.remove_layer(&diff_id).unwrap();
        assert!(!storage.has_layer(&diff_id));
        assert_eq!(fs::read_dir(home.tmp_dir()).unwrap().count(), 0);
        assert!(storage.list_layers().unwrap().is_empty());
    }
}
