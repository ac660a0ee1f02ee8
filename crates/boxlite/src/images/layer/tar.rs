//! A streaming tar reader for layer tars (POSIX.1-2001 pax, GNU and USTAR, as read by Go's
//! `archive/tar`, which wrote nearly every layer in existence).
//!
//! It exists because a layer is hostile input and the general-purpose readers trust too much:
//! GNU long-name, long-link and pax records are read into memory whole, so a 4 GiB `L` member is
//! a 4 GiB allocation. Here every metadata record is capped at [`MAX_META`], the pax `size`
//! overrides the header as Go does, header-only types (directories, links, devices, FIFOs)
//! carry no data whatever their size field says (Go's reading, so we see the same tree other
//! runtimes see), and sparse files (GNU old format and pax 0.1/1.0) are expanded with their maps
//! validated. Header fields are decoded with the `tar` crate's `Header`.

use std::io::{self, Read};

use tar::{EntryType, Header, PaxExtensions};

const BLOCK: u64 = 512;

/// Largest GNU long name, long link or pax record set accepted (real ones are < 10 KiB).
pub const MAX_META: u64 = 1 << 20;

/// Largest member size accepted (4 EiB; keeps block arithmetic far from overflow).
const MAX_MEMBER_SIZE: u64 = 1 << 62;

/// Most sparse-map entries accepted for one file.
const MAX_SPARSE_ENTRIES: usize = 1 << 20;

/// A malformed archive; `offset` is the byte offset of the header at fault.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("corrupt tar at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("reading tar at offset {offset}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One member's header, with pax and GNU records folded in.
#[derive(Debug, Clone)]
pub struct Member {
    /// The name as written (not yet cleaned).
    pub name: Vec<u8>,
    /// Symlink or hardlink target as written.
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `SCHILY.xattr.*` records: name without the prefix, value bytes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The file's logical size (after sparse expansion).
    pub size: u64,
}

/// Reads members one at a time; [`TarReader::data`] reads the current member's content.
pub struct TarReader<R> {
    inner: R,
    /// Bytes consumed from `inner`.
    pos: u64,
    /// Archive bytes of the current member's data not read yet.
    data_left: u64,
    /// Padding after the current member's data.
    pad: u64,
    /// Sparse layout of the current member (`None`: contiguous).
    sparse: Option<Sparse>,
    /// Logical position in the current member.
    logical: u64,
    /// Logical size of the current member.
    logical_size: u64,
    done: bool,
}

#[derive(Debug)]
struct Sparse {
    /// (offset, length) of the data chunks, sorted, disjoint, inside the logical size.
    chunks: Vec<(u64, u64)>,
    next: usize,
}

/// Pax records that matter, gathered from an `x` member.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    sparse_map: Option<Vec<u8>>,
    /// Pax sparse 0.0: `GNU.sparse.offset` and `GNU.sparse.numbytes` records in pairs.
    sparse_pairs: Vec<(u64, Option<u64>)>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> TarReader<R> {
        TarReader {
            inner,
            pos: 0,
            data_left: 0,
            pad: 0,
            sparse: None,
            logical: 0,
            logical_size: 0,
            done: false,
        }
    }

    /// Gives the underlying reader back (to read what follows the end-of-archive blocks).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next member, skipping whatever of the previous one was not read. `None` at the
    /// end-of-archive block (or at a clean EOF on a block boundary, as Go accepts).
    pub fn next_member(&mut self) -> Result<Option<Member>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.data_left + self.pad)?;
        self.data_left = 0;
        self.pad = 0;
        self.sparse = None;
        self.logical = 0;
        self.logical_size = 0;

        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Pax> = None;
        loop {
            let offset = self.pos;
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(corrupt(offset, "archive ends after an extended header"));
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            check_checksum(header, offset)?;
            let header_size = header
                .entry_size()
                .map_err(|e| corrupt(offset, &format!("bad size field: {e}")))?;
            let typeflag = header.as_bytes()[156];
            match typeflag {
                b'L' | b'K' | b'x' | b'g' => {
                    let data = self.read_meta(header_size, offset)?;
                    match typeflag {
                        b'L' => long_name = Some(trim_nul(data)),
                        b'K' => long_link = Some(trim_nul(data)),
                        b'x' => {
                            if pax.is_some() {
                                return Err(corrupt(offset, "two pax headers for one member"));
                            }
                            pax = Some(parse_pax(&data, offset)?)
                        }
                        // Global records (`comment` and the like) change nothing we apply.
                        _ => {}
                    }
                    continue;
                }
                b'V' => {
                    // A volume label is not a file.
                    if header_size > MAX_META {
                        return Err(corrupt(offset, "oversized volume label"));
                    }
                    self.skip(round_up(header_size))?;
                    continue;
                }
                _ => {}
            }
            let pax = pax.take().unwrap_or_default();
            let member = self.member(
                header,
                typeflag,
                header_size,
                long_name,
                long_link,
                pax,
                offset,
            )?;
            return Ok(Some(member));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn member(
        &mut self,
        header: &Header,
        typeflag: u8,
        header_size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Pax,
        offset: u64,
    ) -> Result<Member, TarError> {
        // A field left blank (all NULs or spaces) reads as 0, as in Go and GNU tar.
        let bytes = header.as_bytes();
        let field = |what: &str, e: io::Error| {
            let range = match what {
                "mode" => 100..108,
                "uid" => 108..116,
                "gid" => 116..124,
                "mtime" => 136..148,
                "devmajor" => 329..337,
                _ => 337..345,
            };
            if bytes[range].iter().all(|&b| b == 0 || b == b' ') {
                None
            } else {
                Some(corrupt(offset, &format!("bad {what} field: {e}")))
            }
        };
        let or_zero = |r: io::Result<u64>, what: &str| match r {
            Ok(v) => Ok(v),
            Err(e) => field(what, e).map_or(Ok(0), Err),
        };
        let mut name = pax
            .path
            .clone()
            .or(long_name)
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let link = pax
            .linkpath
            .clone()
            .or(long_link)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
            .unwrap_or_default();
        let mut kind = match typeflag {
            b'0' | b'7' | b'S' => Kind::File,
            0 if name.ends_with(b"/") => Kind::Dir,
            0 => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(corrupt(
                    offset,
                    &format!(
                        "member {:?} has unsupported type {:?}",
                        String::from_utf8_lossy(&name),
                        EntryType::new(other)
                    ),
                ))
            }
        };
        let archive_size = pax.size.unwrap_or(header_size);
        if archive_size > MAX_MEMBER_SIZE {
            return Err(corrupt(
                offset,
                &format!("member size {archive_size} is absurd"),
            ));
        }
        // A GNU dump directory ('D') carries a listing we skip; other non-files carry nothing.
        let data_size = if kind == Kind::File || typeflag == b'D' {
            archive_size
        } else {
            0
        };
        let (dev_major, dev_minor) = match kind {
            Kind::CharDevice | Kind::BlockDevice => {
                let major = header.device_major().map(|v| u64::from(v.unwrap_or(0)));
                let minor = header.device_minor().map(|v| u64::from(v.unwrap_or(0)));
                (
                    or_zero(major, "devmajor")? as u32,
                    or_zero(minor, "devminor")? as u32,
                )
            }
            _ => (0, 0),
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => {
                let secs = or_zero(header.mtime(), "mtime")?;
                (i64::try_from(secs).unwrap_or(i64::MAX), 0)
            }
        };
        let mode = or_zero(header.mode().map(u64::from), "mode")? as u32 & 0o7777;
        let uid = match pax.uid {
            Some(uid) => uid,
            None => or_zero(header.uid(), "uid")?,
        };
        let gid = match pax.gid {
            Some(gid) => gid,
            None => or_zero(header.gid(), "gid")?,
        };

        // Header-only types: whatever the size field says, no data follows (Go's reading).
        self.data_left = data_size;
        self.pad = round_up(data_size) - data_size;
        self.logical_size = data_size;

        if typeflag == b'S' {
            let chunks = self.gnu_old_sparse_map(header, offset)?;
            let real = header
                .as_gnu()
                .ok_or_else(|| corrupt(offset, "sparse member without a GNU header"))?
                .real_size()
                .map_err(|e| corrupt(offset, &format!("bad realsize field: {e}")))?;
            self.set_sparse(chunks, real, offset)?;
        } else if let Some(major) = pax
            .sparse_major
            .or((pax.sparse_map.is_some() || !pax.sparse_pairs.is_empty()).then_some(0))
        {
            let real = pax
                .sparse_realsize
                .ok_or_else(|| corrupt(offset, "pax sparse member without GNU.sparse.realsize"))?;
            let minor = pax.sparse_minor.unwrap_or(match major {
                0 if pax.sparse_map.is_none() => 0,
                0 => 1,
                _ => 0,
            });
            let chunks = match (major, minor) {
                (0, 0) => pax
                    .sparse_pairs
                    .iter()
                    .map(|&(off, len)| {
                        len.map(|l| (off, l))
                            .ok_or_else(|| corrupt(offset, "GNU.sparse.offset without numbytes"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                (0, 1) => {
                    let map = pax.sparse_map.as_deref().unwrap_or_default();
                    parse_number_list(map, b',', offset)?
                }
                (1, 0) => self.pax_v1_sparse_map(offset)?,
                (ma, mi) => {
                    return Err(corrupt(
                        offset,
                        &format!("pax sparse format {ma}.{mi} is not supported"),
                    ))
                }
            };
            if let Some(real_name) = pax.sparse_name {
                name = real_name;
            }
            kind = Kind::File;
            self.set_sparse(chunks, real, offset)?;
        }

        Ok(Member {
            name,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            dev_major,
            dev_minor,
            xattrs: pax.xattrs,
            size: self.logical_size,
        })
    }

    /// Reads the current member's content (expanded, for sparse files).
    pub fn data(&mut self) -> MemberData<'_, R> {
        MemberData { tar: self }
    }

    fn gnu_old_sparse_map(
        &mut self,
        header: &Header,
        offset: u64,
    ) -> Result<Vec<(u64, u64)>, TarError> {
        let gnu = header
            .as_gnu()
            .ok_or_else(|| corrupt(offset, "sparse member without a GNU header"))?;
        let bad = |e: io::Error| corrupt(offset, &format!("bad sparse map: {e}"));
        let mut chunks = Vec::new();
        for s in gnu.sparse.iter().filter(|s| !s.is_empty()) {
            chunks.push((s.offset().map_err(bad)?, s.length().map_err(bad)?));
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                return Err(corrupt(offset, "archive ends inside a sparse map"));
            }
            // An extension block: 21 (offset, length) pairs of 12 bytes each, then the flag.
            for pair in block[..21 * 24].chunks(24) {
                let s = tar::GnuSparseHeader {
                    offset: pair[..12].try_into().expect("12 bytes"),
                    numbytes: pair[12..].try_into().expect("12 bytes"),
                };
                if s.is_empty() {
                    continue;
                }
                chunks.push((s.offset().map_err(bad)?, s.length().map_err(bad)?));
                if chunks.len() > MAX_SPARSE_ENTRIES {
                    return Err(corrupt(offset, "sparse map too large"));
                }
            }
            extended = block[504] != 0;
        }
        Ok(chunks)
    }

    /// Pax sparse 1.0: the map is decimal text at the start of the data, padded to a block.
    fn pax_v1_sparse_map(&mut self, offset: u64) -> Result<Vec<(u64, u64)>, TarError> {
        let mut numbers = Vec::new();
        let mut current: Option<u64> = None;
        let mut consumed = 0u64;
        let mut wanted: Option<usize> = None;
        loop {
            if let Some(w) = wanted {
                if numbers.len() == 1 + 2 * w {
                    break;
                }
            }
            if self.data_left == 0 || consumed > MAX_META {
                return Err(corrupt(
                    offset,
                    "pax sparse map runs past the member's data",
                ));
            }
            let mut byte = [0u8; 1];
            self.read_exact_counted(&mut byte)?;
            self.data_left -= 1;
            consumed += 1;
            match byte[0] {
                b'\n' => {
                    let n = current
                        .take()
                        .ok_or_else(|| corrupt(offset, "empty number in pax sparse map"))?;
                    numbers.push(n);
                    if numbers.len() == 1 {
                        let count = usize::try_from(n).unwrap_or(usize::MAX);
                        if count > MAX_SPARSE_ENTRIES {
                            return Err(corrupt(offset, "sparse map too large"));
                        }
                        wanted = Some(count);
                    }
                }
                d @ b'0'..=b'9' => {
                    let v = current.unwrap_or(0);
                    current = Some(
                        v.checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(d - b'0')))
                            .ok_or_else(|| corrupt(offset, "number overflow in pax sparse map"))?,
                    );
                }
                _ => return Err(corrupt(offset, "bad character in pax sparse map")),
            }
        }
        let pad = round_up(consumed) - consumed;
        if pad > self.data_left {
            return Err(corrupt(
                offset,
                "pax sparse map runs past the member's data",
            ));
        }
        self.skip(pad)?;
        self.data_left -= pad;
        Ok(numbers[1..].chunks(2).map(|p| (p[0], p[1])).collect())
    }

    fn set_sparse(
        &mut self,
        chunks: Vec<(u64, u64)>,
        real: u64,
        offset: u64,
    ) -> Result<(), TarError> {
        if real > MAX_MEMBER_SIZE {
            return Err(corrupt(offset, &format!("sparse size {real} is absurd")));
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &chunks {
            let stop = off
                .checked_add(len)
                .ok_or_else(|| corrupt(offset, "sparse chunk overflows"))?;
            if off < end || stop > real {
                return Err(corrupt(
                    offset,
                    "sparse map out of order or past the file's size",
                ));
            }
            end = stop;
            total += len;
        }
        if total != self.data_left {
            return Err(corrupt(
                offset,
                &format!(
                    "sparse map holds {total} bytes but the member has {}",
                    self.data_left
                ),
            ));
        }
        self.sparse = Some(Sparse { chunks, next: 0 });
        self.logical_size = real;
        Ok(())
    }

    fn read_meta(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_META {
            return Err(corrupt(
                offset,
                &format!("extended header of {size} bytes (limit {MAX_META})"),
            ));
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact_counted(&mut data)?;
        self.skip(round_up(size) - size)?;
        Ok(data)
    }

    /// Reads one block; `false` at a clean EOF before its first byte.
    fn read_block(&mut self, block: &mut [u8; BLOCK as usize]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(corrupt(self.pos, "archive truncated inside a header")),
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    fn read_exact_counted(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        let offset = self.pos;
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(offset, "archive truncated")
            } else {
                TarError::Io { offset, source }
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let offset = self.pos;
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|source| TarError::Io { offset, source })?;
        self.pos += copied;
        if copied < n {
            return Err(corrupt(offset, "archive truncated"));
        }
        Ok(())
    }
}

/// The content of the current member.
pub struct MemberData<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> MemberData<'_, R> {
    /// Reads the next run of content into `buf`. A hole in a sparse file comes back as
    /// `Ok(Run::Hole(n))` without touching `buf`, so writers can leave holes unwritten.
    pub fn next_run(&mut self, buf: &mut [u8]) -> Result<Run, TarError> {
        let t = &mut *self.tar;
        if t.logical >= t.logical_size {
            return Ok(Run::End);
        }
        let (chunk_start, chunk_end) = match &t.sparse {
            None => (0, t.logical_size),
            Some(s) => match s.chunks.get(s.next) {
                Some(&(off, len)) => (off, off + len),
                None => (t.logical_size, t.logical_size),
            },
        };
        if t.logical < chunk_start {
            let hole = chunk_start - t.logical;
            t.logical = chunk_start;
            return Ok(Run::Hole(hole));
        }
        if t.logical >= chunk_end {
            if let Some(s) = &mut t.sparse {
                s.next += 1;
            }
            // Either the next chunk or the trailing hole; go round again.
            return self.next_run(buf);
        }
        let want = (chunk_end - t.logical).min(buf.len() as u64) as usize;
        let offset = t.pos;
        let n = loop {
            match t.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TarError::Io { offset, source }),
            }
        };
        if n == 0 {
            return Err(corrupt(offset, "archive truncated inside a member's data"));
        }
        t.pos += n as u64;
        t.data_left -= n as u64;
        t.logical += n as u64;
        Ok(Run::Data(n))
    }
}

/// One step of [`MemberData::next_run`].
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// `n` zero bytes that are not stored.
    Hole(u64),
    End,
}

fn check_checksum(header: &Header, offset: u64) -> Result<(), TarError> {
    let stored = header
        .cksum()
        .map_err(|e| corrupt(offset, &format!("bad checksum field: {e}")))?;
    let bytes = header.as_bytes();
    let unsigned: u32 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * 32;
    // Some old writers summed signed chars; accept that too, as GNU tar and Go do.
    let signed: i64 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|&b| i64::from(b as i8))
        .sum::<i64>()
        + 8 * 32;
    if stored != unsigned && i64::from(stored) != signed {
        return Err(corrupt(offset, "header checksum mismatch"));
    }
    Ok(())
}

fn parse_pax(data: &[u8], offset: u64) -> Result<Pax, TarError> {
    let mut pax = Pax::default();
    let number = |v: &[u8], key: &str| -> Result<u64, TarError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(offset, &format!("pax record {key} is not a number")))
    };
    for record in PaxExtensions::new(data) {
        let record = record.map_err(|e| corrupt(offset, &format!("malformed pax record: {e}")))?;
        let key = record.key_bytes();
        let value = record.value_bytes();
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"size" => pax.size = Some(number(value, "size")?),
            b"uid" => pax.uid = Some(number(value, "uid")?),
            b"gid" => pax.gid = Some(number(value, "gid")?),
            b"mtime" => pax.mtime = Some(parse_pax_time(value, offset)?),
            b"GNU.sparse.major" => pax.sparse_major = Some(number(value, "GNU.sparse.major")?),
            b"GNU.sparse.minor" => pax.sparse_minor = Some(number(value, "GNU.sparse.minor")?),
            b"GNU.sparse.name" => pax.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                pax.sparse_realsize = Some(number(value, "GNU.sparse.realsize")?)
            }
            b"GNU.sparse.map" => pax.sparse_map = Some(value.to_vec()),
            b"GNU.sparse.offset" => pax
                .sparse_pairs
                .push((number(value, "GNU.sparse.offset")?, None)),
            b"GNU.sparse.numbytes" => match pax.sparse_pairs.last_mut() {
                Some((_, len @ None)) => *len = Some(number(value, "GNU.sparse.numbytes")?),
                _ => return Err(corrupt(offset, "GNU.sparse.numbytes without an offset")),
            },
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if !name.is_empty() {
                        pax.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(pax)
}

/// `1700000000`, `1700000000.5`, `-1.25` (pax mtime: decimal seconds with optional fraction).
fn parse_pax_time(value: &[u8], offset: u64) -> Result<(i64, u32), TarError> {
    let bad = || corrupt(offset, "pax record mtime is not a time");
    let text = std::str::from_utf8(value).map_err(|_| bad())?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().map_err(|_| bad())?;
    if negative && nanos > 0 {
        // -1.25 is 1.25 s before the epoch: (-2 s, 0.75 s).
        Ok((secs - 1, 1_000_000_000 - nanos))
    } else {
        Ok((secs, nanos))
    }
}

fn parse_number_list(text: &[u8], sep: u8, offset: u64) -> Result<Vec<(u64, u64)>, TarError> {
    let mut numbers = Vec::new();
    for part in text.split(|&b| b == sep) {
        let n: u64 = std::str::from_utf8(part)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(offset, "bad number in GNU.sparse.map"))?;
        numbers.push(n);
    }
    if numbers.len() % 2 != 0 || numbers.len() / 2 > MAX_SPARSE_ENTRIES {
        return Err(corrupt(
            offset,
            "GNU.sparse.map has an odd or huge number of values",
        ));
    }
    Ok(numbers.chunks(2).map(|p| (p[0], p[1])).collect())
}

fn trim_nul(mut data: Vec<u8>) -> Vec<u8> {
    if let Some(end) = data.iter().position(|&b| b == 0) {
        data.truncate(end);
    }
    data
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn corrupt(offset: u64, reason: &str) -> TarError {
    TarError::Corrupt {
        offset,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: EntryType, size: u64) -> Header {
        let mut h = Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    fn collect(bytes: &[u8]) -> Result<Vec<(Member, Vec<u8>)>, TarError> {
        let mut r = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(m) = r.next_member()? {
            let mut content = Vec::new();
            let mut data = r.data();
            let mut buf = [0u8; 7];
            loop {
                match data.next_run(&mut buf)? {
                    Run::Data(n) => content.extend_from_slice(&buf[..n]),
                    Run::Hole(n) => content.extend(std::iter::repeat_n(0, n as usize)),
                    Run::End => break,
                }
            }
            out.push((m, content));
        }
        Ok(out)
    }

    #[test]
    fn caps_long_name_records() {
        let mut tar = header("././@LongLink", EntryType::GNULongName, 8 << 20)
            .as_bytes()
            .to_vec();
        tar[156] = b'L';
        let h = Header::from_byte_slice(&tar);
        let mut h = h.clone();
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(vec![b'a'; 8 << 20]);
        let err = collect(&bytes).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
    }

    #[test]
    fn header_only_types_carry_no_data() {
        // A directory claiming 512 bytes of data: Go reads none, so the next header follows.
        let mut bytes = header("d/", EntryType::Directory, 512).as_bytes().to_vec();
        let data = b"abc";
        bytes.extend_from_slice(header("d/f", EntryType::Regular, 3).as_bytes());
        bytes.extend_from_slice(data);
        bytes.extend(vec![0u8; 509 + 1024]);
        let members = collect(&bytes).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[1].1, b"abc");
    }

    #[test]
    fn gnu_dump_directory_listing_is_skipped() {
        let mut h = header("d/", EntryType::Directory, 6);
        h.as_mut_bytes()[156] = b'D';
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(b"Yf\0\0\0\0");
        bytes.extend(vec![0u8; 506]);
        bytes.extend_from_slice(header("d/f", EntryType::Regular, 2).as_bytes());
        bytes.extend_from_slice(b"ok");
        bytes.extend(vec![0u8; 510 + 1024]);
        let members = collect(&bytes).unwrap();
        assert_eq!(members[0].0.kind, Kind::Dir);
        assert_eq!(members[1].0.name, b"d/f");
        assert_eq!(members[1].1, b"ok");
    }

    #[test]
    fn truncated_data_is_an_error() {
        let mut bytes = header("f", EntryType::Regular, 100).as_bytes().to_vec();
        bytes.extend_from_slice(b"short");
        let err = collect(&bytes).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn bad_checksum_is_an_error() {
        let mut bytes = header("f", EntryType::Regular, 0).as_bytes().to_vec();
        bytes[0] = b'g';
        assert!(collect(&bytes)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000", 0).unwrap(), (1700000000, 0));
        assert_eq!(
            parse_pax_time(b"1700000000.5", 0).unwrap(),
            (1700000000, 500_000_000)
        );
        assert_eq!(parse_pax_time(b"-1.25", 0).unwrap(), (-2, 750_000_000));
        assert!(parse_pax_time(b"12x", 0).is_err());
    }
}
