//! Walking a qcow2 backing chain before anything opens it.
//!
//! QEMU opens an image's backing file recursively; a chain that loops (A→A, A→B→A) or that is
//! thousands of levels deep is a hazard for whoever opens it, and a backing file whose format is
//! not recorded is probed — which lets a raw disk that *looks* like qcow2 name any host file as
//! its backing file. So before boxlite creates an overlay on an image, attaches it or hands it
//! to `qemu-img`, it walks the chain itself: it reads each qcow2 header (qcow2 spec,
//! docs/interop/qcow2.txt: header fields, header extensions 0xE2792ACA "backing file format name"
//! and 0x44415441 "external data file name"), with a depth limit, and refuses:
//!
//! - a file that appears twice (a loop), by its canonical path, whatever the spelling;
//! - a chain longer than [`MAX_CHAIN_DEPTH`] files;
//! - a backing file without a recorded format, or with a format other than raw or qcow2;
//! - a backing name with a protocol prefix (`json:`, `nbd:`…) instead of a file path;
//! - an external data file (another way for an image to name a host file).
//!
//! Only headers are read here; qcow2 metadata is never written by hand.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::rootfs::qemu_img::ImageFormat;

/// Most files (the top image included) a backing chain may have.
pub const MAX_CHAIN_DEPTH: usize = 32;

const QCOW2_MAGIC: u32 = 0x5146_49fb;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// QEMU refuses longer backing names too.
const MAX_BACKING_NAME: u32 = 1023;
/// The header and its extensions live in the first cluster; we read at most this much.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why a backing chain is refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain comes back to a file it already went through.
    #[error("backing chain of {top} loops: {path} is reached again through backing file {via}")]
    Loop {
        top: PathBuf,
        path: PathBuf,
        via: String,
    },
    /// The chain has more files than [`MAX_CHAIN_DEPTH`].
    #[error("backing chain too deep: {top} has more than {limit} files in its chain (flatten it)")]
    TooDeep { top: PathBuf, limit: usize },
    /// A qcow2 image names a backing file but not its format; probing it is unsafe.
    #[error(
        "{path} names backing file {backing:?} without a backing format; \
         refusing to probe it (recreate the overlay with an explicit backing format)"
    )]
    MissingBackingFormat { path: PathBuf, backing: String },
    /// The recorded backing format is one boxlite does not open.
    #[error(
        "{path}: backing file {backing:?} has format {format:?}; only raw and qcow2 are accepted"
    )]
    UnsupportedFormat {
        path: PathBuf,
        backing: String,
        format: String,
    },
    /// The backing name is a protocol URL or JSON description, not a file path.
    #[error("{path}: backing file {backing:?} is not a plain file path")]
    NotAFilePath { path: PathBuf, backing: String },
    /// The image stores its data in another (host) file.
    #[error("{path}: images with an external data file are not accepted")]
    ExternalDataFile { path: PathBuf },
    /// A file recorded as qcow2 is not a qcow2 image (or its header is damaged).
    #[error("{path}: not a valid qcow2 image: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    /// A file of the chain cannot be read (missing, unreadable).
    #[error("cannot read {path} (in the backing chain of {top})")]
    Io {
        top: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The path as QEMU will open it (relative names joined to the referring image's folder).
    pub path: PathBuf,
    /// The same file, canonical (symlinks and `..` resolved).
    pub canonical: PathBuf,
    pub format: ImageFormat,
    /// Virtual size from the qcow2 header; `None` for raw files (their length).
    pub virtual_size: Option<u64>,
    /// The backing name exactly as stored in this image's header.
    pub backing_name: Option<String>,
}

/// What a qcow2 header says about backing files (only the fields the walk needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub virtual_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub has_data_file: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a qcow2 header from the first bytes of a file.
pub fn parse_header(buf: &[u8]) -> Result<Qcow2Header, String> {
    if buf.len() < 72 {
        return Err("file shorter than a qcow2 header".into());
    }
    if be32(buf, 0) != QCOW2_MAGIC {
        return Err("no qcow2 magic".into());
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(format!("unsupported qcow2 version {version}"));
    }
    let backing_offset = be64(buf, 8) as usize;
    let backing_len = be32(buf, 16);
    let virtual_size = be64(buf, 24);

    let (ext_start, incompatible) = if version == 3 {
        if buf.len() < 104 {
            return Err("qcow2 v3 header truncated".into());
        }
        let header_len = be32(buf, 100) as usize;
        if !(104..=buf.len()).contains(&header_len) {
            return Err(format!("bad header length {header_len}"));
        }
        (header_len, be64(buf, 72))
    } else {
        (72, 0)
    };

    let mut backing_format = None;
    let mut has_data_file = incompatible & INCOMPAT_DATA_FILE != 0;
    let mut at = ext_start;
    loop {
        if at + 8 > buf.len() {
            return Err("header extensions run past the header cluster".into());
        }
        let kind = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        let data = at + 8;
        if kind == EXT_END {
            break;
        }
        if data + len > buf.len() {
            return Err(format!("header extension {kind:#x} runs past the header"));
        }
        match kind {
            EXT_BACKING_FORMAT => {
                let name = String::from_utf8_lossy(&buf[data..data + len]).to_string();
                backing_format = Some(name.trim_end_matches('\0').to_string());
            }
            EXT_DATA_FILE => has_data_file = true,
            _ => {}
        }
        at = data + len.div_ceil(8) * 8;
    }

    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME {
            return Err(format!("backing file name of {backing_len} bytes"));
        }
        let end = backing_offset + backing_len as usize;
        if end > buf.len() {
            return Err("backing file name lies outside the header cluster".into());
        }
        let name = std::str::from_utf8(&buf[backing_offset..end])
            .map_err(|_| "backing file name is not UTF-8".to_string())?;
        Some(name.to_string())
    };

    Ok(Qcow2Header {
        version,
        virtual_size,
        backing_file,
        backing_format,
        has_data_file,
    })
}

/// Reads the header of the qcow2 image at `path`.
pub fn read_header(path: &Path) -> std::io::Result<Result<Qcow2Header, String>> {
    let mut buf = Vec::with_capacity(4096);
    File::open(path)?
        .take(MAX_HEADER_BYTES as u64)
        .read_to_end(&mut buf)?;
    Ok(parse_header(&buf))
}

/// QEMU treats `proto:rest` as a protocol when the colon comes before any slash.
fn is_plain_file_name(name: &str) -> bool {
    match (name.find(':'), name.find('/')) {
        (Some(colon), Some(slash)) => slash < colon,
        (Some(_), None) => false,
        _ => true,
    }
}

/// Where QEMU looks for backing file `name` named by the image at `image`: absolute names as
/// they are, relative ones in the folder of the image as it was opened.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let named = Path::new(name);
    if named.is_absolute() {
        named.to_path_buf()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(named)
    }
}

/// Walks the chain that starts at `top` (opened as `format`), top first.
///
/// Fails on a loop, a chain over [`MAX_CHAIN_DEPTH`] files, an unrecorded or unsupported
/// backing format, a non-file backing name, an external data file or an unreadable file.
pub fn walk(top: &Path, format: ImageFormat) -> Result<Vec<ChainLink>, ChainError> {
    walk_excluding(top, format, &HashSet::new())
}

/// Like [`walk`], and also fails if the chain reaches any of the canonical paths in `forbidden`
/// (used to refuse an overlay that would end up in its own chain).
pub fn walk_excluding(
    top: &Path,
    format: ImageFormat,
    forbidden: &HashSet<PathBuf>,
) -> Result<Vec<ChainLink>, ChainError> {
    let io_err = |path: &Path, source| ChainError::Io {
        top: top.to_path_buf(),
        path: path.to_path_buf(),
        source,
    };
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut links = Vec::new();
    let mut current = top.to_path_buf();
    let mut current_format = format;
    let mut via = String::from("(top)");

    loop {
        if links.len() >= MAX_CHAIN_DEPTH {
            return Err(ChainError::TooDeep {
                top: top.to_path_buf(),
                limit: MAX_CHAIN_DEPTH,
            });
        }
        let canonical = std::fs::canonicalize(&current).map_err(|e| io_err(&current, e))?;
        if forbidden.contains(&canonical) || !seen.insert(canonical.clone()) {
            return Err(ChainError::Loop {
                top: top.to_path_buf(),
                path: canonical,
                via,
            });
        }

        if current_format == ImageFormat::Raw {
            links.push(ChainLink {
                path: current,
                canonical,
                format: ImageFormat::Raw,
                virtual_size: None,
                backing_name: None,
            });
            return Ok(links);
        }

        let header = read_header(&current)
            .map_err(|e| io_err(&current, e))?
            .map_err(|reason| ChainError::BadHeader {
                path: current.clone(),
                reason,
            })?;
        if header.has_data_file {
            return Err(ChainError::ExternalDataFile { path: current });
        }
        links.push(ChainLink {
            path: current.clone(),
            canonical,
            format: ImageFormat::Qcow2,
            virtual_size: Some(header.virtual_size),
            backing_name: header.backing_file.clone(),
        });
        let Some(backing) = header.backing_file else {
            return Ok(links);
        };

        if !is_plain_file_name(&backing) {
            return Err(ChainError::NotAFilePath {
                path: current,
                backing,
            });
        }
        let next_format = match header.backing_format.as_deref() {
            None | Some("") => {
                return Err(ChainError::MissingBackingFormat {
                    path: current,
                    backing,
                })
            }
            Some(name) => {
                ImageFormat::from_name(name).ok_or_else(|| ChainError::UnsupportedFormat {
                    path: current.clone(),
                    backing: backing.clone(),
                    format: name.to_string(),
                })?
            }
        };
        let next = resolve_backing(&current, &backing);
        via = format!("{backing:?} named by {}", current.display());
        current = next;
        current_format = next_format;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_prefixes_are_not_file_names() {
        assert!(is_plain_file_name("base.raw"));
        assert!(is_plain_file_name("../images/rootfs/x.raw"));
        assert!(is_plain_file_name("./a:b.raw"));
        assert!(!is_plain_file_name("json:{\"file\":1}"));
        assert!(!is_plain_file_name("nbd:localhost:10809"));
        assert!(!is_plain_file_name("a:b.raw"));
    }

    #[test]
    fn garbage_headers_are_refused_not_panicked_on() {
        assert!(parse_header(b"").is_err());
        assert!(parse_header(&[0u8; 200]).is_err());
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_header(&h).is_err(), "header length past the buffer");
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            parse_header(&h).is_err(),
            "extension length past the buffer"
        );
    }
}
