//! [`ImageStore`]: the content-addressed blob store (`images/blobs/sha256/<hex>`), in the manner
//! of an OCI image layout's `blobs/` (OCI image spec v1.1, "content descriptors": a blob is only
//! ever known by the digest of its bytes).
//!
//! Guarantees:
//! - A blob under its name hashes to that name and has the descriptor's size: bytes are hashed
//!   and counted while they stream in, and written to the temporary folder first; only verified
//!   content is renamed into place. A body longer than its descriptor is cut off at once.
//! - Downloads resume: a download in progress lives at `tmp/blob-<hex>.partial`; after a crash or
//!   a kill, the next attempt hashes what is there and asks for the rest with HTTP `Range`. A
//!   partial that turns out wrong is deleted.
//! - Two processes pulling the same blob take turns on `tmp/blob-<hex>.lock` (`flock`); the
//!   second finds the blob present and fetches nothing. Lock files are left behind on purpose:
//!   deleting one while another process waits on it would let a third take a different lock.
//! - A download can hand its bytes to a reader as they arrive ([`tee`]), so a layer is extracted
//!   while it downloads. That reader sees the end of the data only once the blob is verified and
//!   in place; a download that fails, resumes or starts over gives it an error instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::home::Home;
use crate::images::chunks::{chunks, ChunkReader, ChunkSender};
use crate::images::digest::Digest;
use crate::images::registry::RegistryError;

const CHUNK: usize = 256 * 1024;

/// Errors of the blob store. Each names the digest or path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes do not hash to the digest they were fetched or stored as.
    #[error("digest mismatch for {what}: expected {expected}, computed {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    /// More bytes than the descriptor's size.
    #[error("blob {digest} is larger than its descriptor's {expected} bytes")]
    TooLong { digest: Digest, expected: u64 },
    /// The body ended before the descriptor's size (connection dropped); resumable.
    #[error("blob {digest} ended after {received} of {expected} bytes")]
    TooShort {
        digest: Digest,
        expected: u64,
        received: u64,
    },
    /// Reading the body failed midway; what arrived is kept for a resume.
    #[error("downloading blob {digest} failed after {received} bytes")]
    Download {
        digest: Digest,
        received: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl StoreError {
    /// Whether another attempt may succeed (network trouble, not bad content).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::TooShort { .. } | StoreError::Download { .. } => true,
            StoreError::Registry(e) => e.is_transient(),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What [`ImageStore::fetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The blob was already there; nothing was requested.
    Present,
    /// The blob was downloaded; `bytes` came over the wire this time (less than the size when a
    /// partial download was resumed).
    Downloaded { bytes: u64, resumed_from: u64 },
}

/// A source of blob bytes from an offset on: returns the body and whether it starts at the
/// offset (`true`, a honoured `Range`) or at byte 0 (`false`).
pub type BlobSource<'a> =
    dyn FnMut(u64) -> std::result::Result<(Box<dyn Read + Send>, bool), RegistryError> + 'a;

/// Blobs by digest under one home folder.
#[derive(Debug, Clone)]
pub struct ImageStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl ImageStore {
    pub fn new(home: &Home) -> ImageStore {
        ImageStore {
            blobs: home.blobs_dir(),
            tmp: home.tmp_dir(),
        }
    }

    /// Where blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The whole blob, for small documents (manifests, configs).
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        std::fs::read(&path).map_err(|source| StoreError::Io {
            action: "reading blob",
            path,
            source,
        })
    }

    /// Every blob in the store.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let entries = std::fs::read_dir(&self.blobs).map_err(|source| StoreError::Io {
            action: "listing",
            path: self.blobs.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Digest::from_hex(&e.file_name().to_string_lossy()).ok())
            .collect())
    }

    /// Deletes blob `digest`; absent is fine.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                action: "removing blob",
                path,
                source,
            }),
        }
    }

    /// Stores `bytes` as `expected` after checking they hash to it; `what` names them in errors.
    pub fn put_bytes(&self, expected: &Digest, bytes: &[u8], what: &str) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                what: what.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        if self.contains(expected) {
            return Ok(());
        }
        let mut tmp = self.temp_file()?;
        tmp.write_all(bytes)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|source| StoreError::Io {
                action: "writing",
                path: tmp.path().to_path_buf(),
                source,
            })?;
        self.persist(tmp, expected)
    }

    /// Stores whatever `reader` yields under the digest it turns out to have; when `expected`
    /// is given the content must hash to it. Returns the digest and size.
    pub fn ingest(
        &self,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
        what: &str,
    ) -> Result<(Digest, u64)> {
        let mut tmp = self.temp_file()?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).map_err(|source| StoreError::Io {
                action: "reading",
                path: PathBuf::from(what),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            tmp.write_all(&buf[..n]).map_err(|source| StoreError::Io {
                action: "writing",
                path: tmp.path().to_path_buf(),
                source,
            })?;
        }
        let actual = Digest::from_hasher(hasher);
        if let Some(expected) = expected {
            if &actual != expected {
                return Err(StoreError::DigestMismatch {
                    what: what.to_string(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        if !self.contains(&actual) {
            tmp.as_file().sync_all().map_err(|source| StoreError::Io {
                action: "syncing",
                path: tmp.path().to_path_buf(),
                source,
            })?;
            self.persist(tmp, &actual)?;
        }
        Ok((actual, size))
    }

    /// Makes blob `digest` (of `size` bytes) present, downloading from `source` if needed, with
    /// the lock, resume and verification rules of this module. `progress` hears of every chunk.
    pub fn fetch(
        &self,
        digest: &Digest,
        size: u64,
        source: &mut BlobSource<'_>,
        progress: &dyn Fn(u64),
    ) -> Result<Fetched> {
        self.fetch_teed(digest, size, source, progress, None)
    }

    /// [`ImageStore::fetch`], also handing the bytes to `tee`'s reader as they arrive. The tee
    /// is only fed by a download from the first byte; when the blob is already present, or the
    /// download resumes a partial, restarts, or fails, the tee is dropped and its reader fails.
    pub fn fetch_teed(
        &self,
        digest: &Digest,
        size: u64,
        source: &mut BlobSource<'_>,
        progress: &dyn Fn(u64),
        mut tee: Option<Tee>,
    ) -> Result<Fetched> {
        if self.contains(digest) {
            return Ok(Fetched::Present);
        }
        let _lock = self.lock(digest)?;
        if self.contains(digest) {
            debug!(%digest, "blob arrived while waiting for its lock");
            return Ok(Fetched::Present);
        }

        let partial_path = self.tmp.join(format!("blob-{}.partial", digest.hex()));
        let io_err = |action, source| StoreError::Io {
            action,
            path: partial_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial_path)
            .map_err(|e| io_err("opening", e))?;
        let (mut hasher, mut have) =
            resume_state(&mut file, size).map_err(|e| io_err("reading", e))?;
        if have > 0 {
            progress(have);
            tee = None;
        }

        let (mut body, resumed) = source(have)?;
        let resumed_from = if resumed { have } else { 0 };
        if !resumed && have > 0 {
            debug!(%digest, have, "server ignored the range request; starting over");
            file.set_len(0).map_err(|e| io_err("truncating", e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("seeking", e))?;
            hasher = Sha256::new();
            have = 0;
        }

        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StoreError::Download {
                        digest: digest.clone(),
                        received: have,
                        source,
                    })
                }
            };
            if have + n as u64 > size {
                drop(file);
                discard(&partial_path);
                return Err(StoreError::TooLong {
                    digest: digest.clone(),
                    expected: size,
                });
            }
            file.write_all(&buf[..n])
                .map_err(|e| io_err("writing", e))?;
            if tee.as_ref().is_some_and(|t| !t.send(&buf[..n])) {
                debug!(%digest, "the blob's reader went away; downloading on alone");
                tee = None;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
            progress(n as u64);
        }
        if have < size {
            return Err(StoreError::TooShort {
                digest: digest.clone(),
                expected: size,
                received: have,
            });
        }

        let actual = Digest::from_hasher(hasher);
        if &actual != digest {
            drop(file);
            discard(&partial_path);
            return Err(StoreError::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.clone(),
                actual,
            });
        }
        file.sync_all().map_err(|e| io_err("syncing", e))?;
        drop(file);
        let dest = self.blob_path(digest);
        std::fs::rename(&partial_path, &dest).map_err(|source| StoreError::Io {
            action: "renaming into the store",
            path: dest,
            source,
        })?;
        if let Some(tee) = tee {
            tee.verified();
        }
        Ok(Fetched::Downloaded {
            bytes: size - resumed_from,
            resumed_from,
        })
    }

    /// Deletes partial downloads that no process is working on; returns the bytes freed.
    pub fn remove_stale_partials(&self) -> Result<u64> {
        let entries = std::fs::read_dir(&self.tmp).map_err(|source| StoreError::Io {
            action: "listing",
            path: self.tmp.clone(),
            source,
        })?;
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name
                .strip_prefix("blob-")
                .and_then(|n| n.strip_suffix(".partial"))
            else {
                continue;
            };
            let lock_path = self.tmp.join(format!("blob-{hex}.lock"));
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
            else {
                continue;
            };
            if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                discard(&entry.path());
            }
        }
        Ok(freed)
    }

    /// Blocks until this process holds the download lock of `digest`.
    fn lock(&self, digest: &Digest) -> Result<Flock<File>> {
        let path = self.tmp.join(format!("blob-{}.lock", digest.hex()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                action: "opening lock",
                path: path.clone(),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError::Io {
            action: "locking",
            path,
            source: io::Error::from(errno),
        })
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".tmp")
            .tempfile_in(&self.tmp)
            .map_err(|source| StoreError::Io {
                action: "creating a temporary file in",
                path: self.tmp.clone(),
                source,
            })
    }

    fn persist(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            action: "renaming into the store",
            path: dest,
            source: e.error,
        })?;
        Ok(())
    }
}

/// Hashes what an earlier attempt left in `file`, leaving the cursor at its end. A partial
/// longer than the blob cannot be right and is emptied.
/// Chunks a tee holds before the download waits for its reader.
const TEE_CHUNKS: usize = 64;

/// The writing end of [`tee`]: held by one download.
pub struct Tee(ChunkSender);

impl Tee {
    /// Hands `bytes` to the reader, waiting while it is [`TEE_CHUNKS`] chunks behind; false
    /// when the reader is gone.
    fn send(&self, bytes: &[u8]) -> bool {
        self.0.send(bytes.to_vec())
    }

    /// The blob is complete, verified and stored.
    fn verified(self) {
        self.0.end();
    }
}

/// The reading end of [`tee`]: the blob's bytes in order, then the end of the data once the
/// blob is verified and stored, or an error if the download did not get there (then
/// [`ChunkReader::abandoned`] is set).
pub type TeeReader = ChunkReader;

/// A pair that lets a reader follow a download ([`ImageStore::fetch_teed`]).
pub fn tee() -> (Tee, TeeReader) {
    let (tx, rx) = chunks(
        TEE_CHUNKS,
        "the download feeding this reader stopped before the blob was verified",
    );
    (Tee(tx), rx)
}

fn resume_state(file: &mut File, size: u64) -> io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let len = file.metadata()?.len();
    if len > size {
        file.set_len(0)?;
        return Ok((hasher, 0));
    }
    file.seek(SeekFrom::Start(0))?;
    let copied = io::copy(&mut file.take(len), &mut HashWriter(&mut hasher))?;
    file.seek(SeekFrom::Start(copied))?;
    Ok((hasher, copied))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn discard(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot delete a bad partial download");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        (dir, ImageStore::new(&home))
    }

    fn serve(
        data: Vec<u8>,
        honour_range: bool,
    ) -> impl FnMut(u64) -> std::result::Result<(Box<dyn Read + Send>, bool), RegistryError> {
        move |offset| {
            if honour_range {
                Ok((
                    Box::new(io::Cursor::new(data[offset as usize..].to_vec())),
                    true,
                ))
            } else {
                Ok((Box::new(io::Cursor::new(data.clone())), false))
            }
        }
    }

    #[test]
    fn verifies_and_places() {
        let (_d, store) = store();
        let data = b"hello blob".to_vec();
        let digest = Digest::of(&data);
        let got = store
            .fetch(
                &digest,
                data.len() as u64,
                &mut serve(data.clone(), true),
                &|_| {},
            )
            .unwrap();
        assert_eq!(
            got,
            Fetched::Downloaded {
                bytes: 10,
                resumed_from: 0
            }
        );
        assert_eq!(store.read(&digest).unwrap(), data);
        let again = store
            .fetch(
                &digest,
                10,
                &mut |_| panic!("must not be fetched again"),
                &|_| {},
            )
            .unwrap();
        assert_eq!(again, Fetched::Present);
    }

    #[test]
    fn wrong_bytes_are_dropped() {
        let (_d, store) = store();
        let digest = Digest::of(b"genuine!");
        let err = store
            .fetch(&digest, 8, &mut serve(b"evil....".to_vec(), true), &|_| {})
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&digest.to_string()));
        assert!(!store.contains(&digest));
        assert!(!store
            .tmp
            .join(format!("blob-{}.partial", digest.hex()))
            .exists());
        let err = store
            .fetch(
                &digest,
                8,
                &mut serve(b"genuine!andmore".to_vec(), true),
                &|_| {},
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLong { .. }), "{err}");
    }

    /// A 100 000-byte blob of which the first 40 000 bytes are already a partial download.
    fn partly_downloaded(store: &ImageStore) -> (Vec<u8>, Digest) {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let partial = store.tmp.join(format!("blob-{}.partial", digest.hex()));
        std::fs::write(&partial, &data[..40_000]).unwrap();
        (data, digest)
    }

    /// Reads a tee to its end on another thread, as an extraction does.
    fn follow(reader: TeeReader) -> std::thread::JoinHandle<io::Result<Vec<u8>>> {
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        })
    }

    #[test]
    fn a_tee_ends_only_after_verification() {
        let (_d, store) = store();
        // Larger than the tee's buffer: the download waits for its reader.
        let data: Vec<u8> = (0..(CHUNK * (TEE_CHUNKS + 8)) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let digest = Digest::of(&data);
        let (tee, reader) = super::tee();
        let broken = reader.abandoned();
        let reading = follow(reader);
        let size = data.len() as u64;
        store
            .fetch_teed(
                &digest,
                size,
                &mut serve(data.clone(), true),
                &|_| {},
                Some(tee),
            )
            .unwrap();
        assert!(
            reading.join().unwrap().unwrap() == data,
            "the reader saw the blob"
        );
        assert!(!broken.load(Ordering::Relaxed));

        // Wrong bytes: the reader saw them but gets an error, never the end of the data.
        let genuine = Digest::of(b"genuine!");
        let (tee, reader) = super::tee();
        let broken = reader.abandoned();
        let reading = follow(reader);
        let evil = serve(b"evil....".to_vec(), true);
        assert!(store
            .fetch_teed(&genuine, 8, &mut { evil }, &|_| {}, Some(tee))
            .is_err());
        let err = reading.join().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("before the blob was verified"),
            "{err}"
        );
        assert!(broken.load(Ordering::Relaxed), "the download broke it");

        // Already present: nothing to follow.
        let (tee, reader) = super::tee();
        let reading = follow(reader);
        let got = store
            .fetch_teed(
                &digest,
                size,
                &mut |_| panic!("present"),
                &|_| {},
                Some(tee),
            )
            .unwrap();
        assert_eq!(got, Fetched::Present);
        assert!(reading.join().unwrap().is_err());
    }

    #[test]
    fn a_reader_that_gives_up_does_not_stop_the_download() {
        let (_d, store) = store();
        let data: Vec<u8> = (0..(CHUNK * (TEE_CHUNKS + 8)) as u32)
            .map(|i| (i % 241) as u8)
            .collect();
        let digest = Digest::of(&data);
        let (tee, reader) = super::tee();
        let broken = reader.abandoned();
        let reading = std::thread::spawn(move || {
            let mut reader = reader;
            let mut first = vec![0u8; 1000];
            reader.read_exact(&mut first).map(|_| first)
        });
        let size = data.len() as u64;
        store
            .fetch_teed(
                &digest,
                size,
                &mut serve(data.clone(), true),
                &|_| {},
                Some(tee),
            )
            .unwrap();
        assert_eq!(reading.join().unwrap().unwrap(), data[..1000]);
        assert!(
            !broken.load(Ordering::Relaxed),
            "the reader quit on its own"
        );
        assert_eq!(store.read(&digest).unwrap(), data);
    }

    #[test]
    fn a_resumed_download_does_not_feed_a_tee() {
        let (_d, store) = store();
        let (data, digest) = partly_downloaded(&store);
        let (tee, reader) = super::tee();
        let reading = follow(reader);
        let got = store
            .fetch_teed(
                &digest,
                100_000,
                &mut serve(data.clone(), true),
                &|_| {},
                Some(tee),
            )
            .unwrap();
        assert_eq!(
            got,
            Fetched::Downloaded {
                bytes: 60_000,
                resumed_from: 40_000
            }
        );
        assert!(
            reading.join().unwrap().is_err(),
            "the reader would miss the first 40 000 bytes"
        );
        assert_eq!(store.read(&digest).unwrap(), data);
    }

    #[test]
    fn resumes_a_partial() {
        let (_d, store) = store();
        let (data, digest) = partly_downloaded(&store);
        let asked = std::cell::Cell::new(None);
        let mut source = |offset: u64| {
            asked.set(Some(offset));
            serve(data.clone(), true)(offset)
        };
        let got = store
            .fetch(&digest, data.len() as u64, &mut source, &|_| {})
            .unwrap();
        assert_eq!(asked.get(), Some(40_000));
        assert_eq!(
            got,
            Fetched::Downloaded {
                bytes: 60_000,
                resumed_from: 40_000
            }
        );
        assert_eq!(store.read(&digest).unwrap(), data);

        // A server that ignores Range: start over, still right.
        let data2 = b"second blob".to_vec();
        let d2 = Digest::of(&data2);
        std::fs::write(store.tmp.join(format!("blob-{}.partial", d2.hex())), b"sec").unwrap();
        store
            .fetch(&d2, 11, &mut serve(data2.clone(), false), &|_| {})
            .unwrap();
        assert_eq!(store.read(&d2).unwrap(), data2);
    }
}
