//! QEMU's `-netdev stream` framing: each Ethernet frame is preceded by its length as a 4-byte
//! big-endian integer (no virtio-net header). The same transport gvproxy calls "qemu" and passt
//! speaks on its `--socket`.
//!
//! [`FrameDecoder`] turns a byte stream read in arbitrary pieces back into frames and refuses
//! lengths no Ethernet frame can have, so a confused peer cannot make us allocate without bound.

/// Largest frame we accept: a 65535-byte IP packet plus the Ethernet header (what QEMU may send
/// with large MTUs). Anything bigger means the stream is out of step.
pub const MAX_FRAME: usize = 65535 + 14;
/// Smallest meaningful frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// The stream cannot be decoded any further.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("frame length {0} out of range ({MIN_FRAME}..={MAX_FRAME}): the stream is out of step")]
pub struct BadFrameLength(pub usize);

/// Appends one framed Ethernet frame to `out`.
pub fn encode_into(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Reassembles frames from stream reads.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered. Frames shorter than an Ethernet header are
    /// skipped (QEMU never sends them; they carry nothing we could answer).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, BadFrameLength> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < 4 {
                self.compact();
                return Ok(None);
            }
            let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            if len > MAX_FRAME {
                return Err(BadFrameLength(len));
            }
            if avail.len() < 4 + len {
                self.compact();
                return Ok(None);
            }
            let frame = avail[4..4 + len].to_vec();
            self.start += 4 + len;
            if len >= MIN_FRAME {
                return Ok(Some(frame));
            }
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_come_back_whole() {
        let a = vec![1u8; 60];
        let b = vec![2u8; 1514];
        let mut stream = Vec::new();
        encode_into(&mut stream, &a);
        encode_into(&mut stream, &[9u8; 3]);
        encode_into(&mut stream, &b);
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(7) {
            dec.push(piece);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![a, b],
            "the runt frame is skipped, the others intact"
        );
    }

    #[test]
    fn absurd_length_is_an_error() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(dec.next_frame(), Err(BadFrameLength(0xffff_ffff)));
    }
}
