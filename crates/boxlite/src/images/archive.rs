//! The uncompressed byte stream of one layer blob: picks the decompressor from the media type
//! (OCI image spec v1.1 "Image Layer Filesystem Changeset", Docker image manifest v2.2), corrects
//! it by sniffing magic bytes (docker-save archives call gzip layers plain tar), counts the
//! uncompressed bytes and stops at a limit (decompression bombs), and hashes them so the caller
//! can check the layer's diff_id without a second pass.
//!
//! Everything streams: memory use is a few buffers whatever the blob expands to. A compressed
//! blob is inflated on a thread of its own, a few buffers ahead of the reader, so inflating and
//! writing the files it holds run on two cores.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::images::chunks::chunks;
use crate::images::digest::{DiffId, Digest};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (RFC 1952), possibly several members back to back.
    Gzip,
    /// Zstandard (RFC 8878), possibly several frames back to back.
    Zstd,
}

/// Failures while reading a layer blob.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The manifest names a layer media type we do not know how to read.
    #[error("unsupported layer media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    /// The uncompressed stream grew past the configured limit (a decompression bomb or an
    /// oversized layer).
    #[error(
        "layer {digest} expands past the limit of {limit} bytes uncompressed \
         ({limit_mib} MiB); refusing it (decompression bomb?)"
    )]
    LimitExceeded {
        digest: Digest,
        limit: u64,
        limit_mib: u64,
    },
    /// Opening or reading the blob failed.
    #[error("cannot read layer blob {digest}")]
    Read {
        digest: Digest,
        #[source]
        source: io::Error,
    },
}

impl Compression {
    /// The compression a layer media type declares. Accepts the OCI layer types (including the
    /// non-distributable ones), Docker schema-2 `rootfs.diff` and `rootfs.foreign.diff` types, and
    /// `application/octet-stream`-ish unknowns are refused.
    pub fn from_media_type(media_type: &str) -> Result<Compression, ArchiveError> {
        // Parameters (`; charset=...`) are not part of the type.
        let base = media_type.split(';').next().unwrap_or("").trim();
        let compression = match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            _ => {
                return Err(ArchiveError::UnsupportedMediaType {
                    media_type: media_type.to_string(),
                })
            }
        };
        Ok(compression)
    }

    /// The compression the first bytes of a blob show, if any: gzip `1f 8b`, zstd `28 b5 2f fd`.
    pub fn sniff(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// The error inside the `io::Error` that [`LayerStream`] returns once the limit is hit; callers
/// ask [`LayerStream::limit_error`] instead of digging for it through the parser's wrapping.
#[derive(Debug)]
struct LimitHit;

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("uncompressed size limit exceeded")
    }
}

impl std::error::Error for LimitHit {}

/// The uncompressed bytes of one layer blob, counted, limited and hashed as they are read.
///
/// ```no_run
/// # use boxlite::images::archive::{Compression, LayerStream};
/// # fn f(digest: boxlite::images::digest::Digest) -> Result<(), Box<dyn std::error::Error>> {
/// let blob = std::fs::File::open("/path/to/blob")?;
/// let mut stream = LayerStream::open(blob, Compression::Gzip, digest, 64 << 20)?;
/// std::io::copy(&mut stream, &mut std::io::sink())?;
/// let (diff_id, size) = stream.finish();
/// # Ok(()) }
/// ```
pub struct LayerStream {
    inner: Box<dyn Read + Send + Sync>,
    digest: Digest,
    compression: Compression,
    hasher: Sha256,
    count: u64,
    limit: u64,
    hit: bool,
}

impl fmt::Debug for LayerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerStream")
            .field("digest", &self.digest)
            .field("compression", &self.compression)
            .field("count", &self.count)
            .field("limit", &self.limit)
            .finish()
    }
}

impl LayerStream {
    /// Opens `blob` (a file, or any reader over one; its digest `digest` is used in errors) declared as `declared`
    /// compression. When the blob is declared plain tar but starts with gzip or zstd magic, the
    /// magic wins (docker-save archives do this). Reading fails once more than `limit`
    /// uncompressed bytes came out.
    pub fn open(
        blob: impl Read + Send + Sync + 'static,
        declared: Compression,
        digest: Digest,
        limit: u64,
    ) -> Result<LayerStream, ArchiveError> {
        let mut buffered = BufReader::with_capacity(128 * 1024, blob);
        let head = buffered.fill_buf().map_err(|source| ArchiveError::Read {
            digest: digest.clone(),
            source,
        })?;
        let compression = match (declared, Compression::sniff(head)) {
            (Compression::None, Some(sniffed)) => {
                tracing::debug!(%digest, %sniffed, "layer declared as plain tar is compressed");
                sniffed
            }
            _ => declared,
        };
        let inner: Box<dyn Read + Send + Sync> = match compression {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered).map_err(|source| {
                    ArchiveError::Read {
                        digest: digest.clone(),
                        source,
                    }
                })?,
            ),
        };
        let inner = match compression {
            Compression::None => inner,
            _ => read_ahead(inner),
        };
        Ok(LayerStream {
            inner,
            digest,
            compression,
            hasher: Sha256::new(),
            count: 0,
            limit,
            hit: false,
        })
    }

    /// The compression actually used (after sniffing).
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Uncompressed bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The error to report when the limit was hit, if it was. The tar parser above this stream
    /// may wrap the `io::Error` beyond recognition; this flag does not.
    pub fn limit_error(&self) -> Option<ArchiveError> {
        self.hit.then(|| ArchiveError::LimitExceeded {
            digest: self.digest.clone(),
            limit: self.limit,
            limit_mib: self.limit >> 20,
        })
    }

    /// Reads what is left (tar padding after the end-of-archive blocks counts for the diff_id).
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }

    /// The sha256 of everything read (the diff_id when read to the end) and its length.
    pub fn finish(self) -> (DiffId, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.hit {
            return Err(io::Error::other(LimitHit));
        }
        // Ask for at most one byte past the limit: enough to tell "exactly at" from "past".
        let allowed = self.limit.saturating_sub(self.count).saturating_add(1);
        let want = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.count += n as u64;
        if self.count > self.limit {
            self.hit = true;
            return Err(io::Error::other(LimitHit));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Bytes the inflating thread hands over at a time, and how many such chunks it may be ahead.
const AHEAD_CHUNK: usize = 256 * 1024;
const AHEAD_CHUNKS: usize = 8;

/// Reads `inner` on its own thread, up to [`AHEAD_CHUNKS`] chunks ahead. The thread ends at
/// the end of `inner`, at its first error, or when the returned reader is dropped. Where no
/// thread can be started, `inner` is read directly.
fn read_ahead(inner: Box<dyn Read + Send + Sync>) -> Box<dyn Read + Send + Sync> {
    let (tx, rx) = chunks(AHEAD_CHUNKS, "the inflating thread stopped");
    let inner = Arc::new(Mutex::new(Some(inner)));
    let handed = Arc::clone(&inner);
    let spawned = std::thread::Builder::new()
        .name("layer-inflate".into())
        .spawn(move || {
            let Some(mut inner) = handed.lock().expect("inner").take() else {
                return;
            };
            loop {
                let mut chunk = vec![0u8; AHEAD_CHUNK];
                let mut filled = 0;
                while filled < chunk.len() {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            chunk.truncate(filled);
                            if filled == 0 || tx.send(chunk) {
                                tx.fail(e);
                            }
                            return;
                        }
                    }
                }
                let end = filled < chunk.len();
                chunk.truncate(filled);
                if filled > 0 && !tx.send(chunk) {
                    return;
                }
                if end {
                    tx.end();
                    return;
                }
            }
        });
    if spawned.is_err() {
        // The closure never ran: `inner` is still here.
        if let Some(inner) = inner.lock().expect("inner").take() {
            return inner;
        }
    }
    Box::new(rx)
}

// Public types cross threads (extraction runs on workers).
const _: () = {
    fn check<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn all() {
        check::<LayerStream>();
        check::<ArchiveError>();
        check::<Compression>();
    }
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    fn digest() -> Digest {
        Digest::of(b"blob")
    }

    fn temp_blob(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        use std::io::Seek;
        f.rewind().unwrap();
        f
    }

    #[test]
    fn media_types() {
        use Compression::*;
        for (t, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
        ] {
            assert_eq!(Compression::from_media_type(t).unwrap(), c, "{t}");
        }
        let err = Compression::from_media_type("application/vnd.oci.image.config.v1+json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("application/vnd.oci.image.config.v1+json"),
            "{err}"
        );
    }

    #[test]
    fn sniffs_gzip_declared_as_tar_and_hashes_uncompressed() {
        let raw = b"hello uncompressed world".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let blob = temp_blob(&gz.finish().unwrap());
        let mut s = LayerStream::open(blob, Compression::None, digest(), 1 << 20).unwrap();
        assert_eq!(s.compression(), Compression::Gzip);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, raw);
        let (diff_id, n) = s.finish();
        assert_eq!(diff_id, Digest::of(&raw));
        assert_eq!(n, raw.len() as u64);
    }

    #[test]
    fn zstd_round_trip() {
        let raw = vec![7u8; 100_000];
        let blob = temp_blob(&zstd::encode_all(&raw[..], 3).unwrap());
        let mut s = LayerStream::open(blob, Compression::Zstd, digest(), 1 << 20).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn limit_is_exact_and_names_digest() {
        let raw = vec![0u8; 4096];
        let blob = temp_blob(&raw);
        let mut s = LayerStream::open(blob, Compression::None, digest(), 4096).unwrap();
        assert_eq!(s.drain().unwrap(), 4096, "exactly at the limit is fine");

        let blob = temp_blob(&raw);
        let mut s = LayerStream::open(blob, Compression::None, digest(), 4095).unwrap();
        assert!(s.drain().is_err());
        let err = s.limit_error().expect("limit flagged").to_string();
        assert!(
            err.contains(&digest().to_string()) && err.contains("4095"),
            "{err}"
        );
    }

    /// Many read-ahead chunks of varied bytes: what the inflating thread hands over arrives
    /// whole and in order, and the limit still holds to the byte.
    #[test]
    fn inflating_ahead_keeps_order_and_limit() {
        let raw: Vec<u8> = (0..(AHEAD_CHUNK * (AHEAD_CHUNKS * 3) + 12_345) as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let compressed = gz.finish().unwrap();
        let total = raw.len() as u64;
        let mut s =
            LayerStream::open(temp_blob(&compressed), Compression::Gzip, digest(), total).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out == raw, "bytes differ");
        assert_eq!(s.finish(), (Digest::of(&raw), total));

        let mut s = LayerStream::open(
            temp_blob(&compressed),
            Compression::Gzip,
            digest(),
            total - 1,
        )
        .unwrap();
        assert!(s.drain().is_err());
        assert!(s.limit_error().is_some());
    }

    /// A blob cut short fails on the reading side with the decompressor's error, not with a
    /// quiet early end.
    #[test]
    fn a_truncated_blob_fails_through_the_inflating_thread() {
        let raw = vec![42u8; AHEAD_CHUNK * 2];
        for compressed in [
            {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&raw).unwrap();
                (Compression::Gzip, gz.finish().unwrap())
            },
            (Compression::Zstd, zstd::encode_all(&raw[..], 3).unwrap()),
        ] {
            let (compression, bytes) = compressed;
            let cut = &bytes[..bytes.len() - 6];
            let mut s = LayerStream::open(temp_blob(cut), compression, digest(), 1 << 30).unwrap();
            let err = s.drain().unwrap_err();
            assert!(s.limit_error().is_none(), "{compression}: {err}");
        }
    }
}
