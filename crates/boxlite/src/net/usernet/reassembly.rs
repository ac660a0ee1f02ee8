//! Reassembly of IPv4 fragments from the guest (RFC 791 section 3.2, with the overlap rule of
//! RFC 5722 applied to IPv4: a fragment overlapping another discards the whole datagram, so
//! crafted overlaps cannot make us see different bytes than the receiver would).
//!
//! Bounded: at most [`MAX_PENDING`] datagrams in reassembly, each at most 65535 bytes, each
//! dropped [`TIMEOUT`] after its first fragment.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::Ipv4Packet;

/// Datagrams being reassembled at once; fragments of further ones are dropped.
pub const MAX_PENDING: usize = 16;
/// How long the fragments of one datagram may take to arrive.
pub const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PAYLOAD: usize = 65535 - 20;

type Key = (Ipv4Addr, Ipv4Addr, u16, u8);

#[derive(Debug)]
struct Partial {
    /// The first fragment's IPv4 header (options included), reused for the whole datagram.
    header: Vec<u8>,
    data: Vec<u8>,
    /// One bit per 8-byte block received.
    blocks: Vec<u64>,
    total: Option<usize>,
    started: Instant,
}

impl Partial {
    fn new() -> Partial {
        Partial {
            header: Vec::new(),
            data: vec![0; MAX_PAYLOAD],
            blocks: vec![0; MAX_PAYLOAD.div_ceil(8).div_ceil(64)],
            total: None,
            started: Instant::now(),
        }
    }

    /// Marks blocks [first, last] as received; false if any was already there (overlap).
    fn mark(&mut self, first: usize, last: usize) -> bool {
        for b in first..=last {
            let (word, bit) = (b / 64, 1u64 << (b % 64));
            if self.blocks[word] & bit != 0 {
                return false;
            }
            self.blocks[word] |= bit;
        }
        true
    }

    fn complete(&self) -> bool {
        let Some(total) = self.total else {
            return false;
        };
        (0..total.div_ceil(8)).all(|b| self.blocks[b / 64] & (1u64 << (b % 64)) != 0)
    }
}

/// The fragments in flight.
#[derive(Debug, Default)]
pub struct Reassembler {
    pending: HashMap<Key, Partial>,
}

impl Reassembler {
    /// Takes one fragment; returns the whole IPv4 packet (unfragmented header + payload) when
    /// this fragment completes it.
    pub fn push(&mut self, ip: &Ipv4Packet<&[u8]>) -> Option<Vec<u8>> {
        let key = (
            ip.src_addr(),
            ip.dst_addr(),
            ip.ident(),
            u8::from(ip.next_header()),
        );
        let offset = usize::from(ip.frag_offset());
        let payload = ip.payload();
        let end = offset + payload.len();
        let more = ip.more_frags();
        // Every fragment but the last carries a multiple of 8 bytes; nothing may pass 65535.
        if payload.is_empty() || end > MAX_PAYLOAD || (more && !payload.len().is_multiple_of(8)) {
            self.pending.remove(&key);
            return None;
        }
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            return None;
        }
        let partial = self.pending.entry(key).or_insert_with(Partial::new);
        if !partial.mark(offset / 8, (end - 1) / 8) {
            self.pending.remove(&key);
            return None;
        }
        if !more {
            if partial.total.is_some_and(|t| t != end) {
                self.pending.remove(&key);
                return None;
            }
            partial.total = Some(end);
        }
        if partial.total.is_some_and(|t| end > t) {
            self.pending.remove(&key);
            return None;
        }
        partial.data[offset..end].copy_from_slice(payload);
        if offset == 0 {
            let hlen = usize::from(ip.header_len());
            partial.header = ip.as_ref()[..hlen].to_vec();
        }
        if !partial.complete() || partial.header.is_empty() {
            return None;
        }
        let partial = self.pending.remove(&key)?;
        let total = partial.total?;
        let mut packet = partial.header;
        packet.extend_from_slice(&partial.data[..total]);
        let len = packet.len() as u16;
        let mut p = Ipv4Packet::new_unchecked(&mut packet[..]);
        p.set_total_len(len);
        p.set_more_frags(false);
        p.set_frag_offset(0);
        p.fill_checksum();
        Some(packet)
    }

    /// Drops datagrams whose fragments took too long.
    pub fn expire(&mut self) {
        self.pending.retain(|_, p| p.started.elapsed() < TIMEOUT);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::usernet::packet::udp_frames;
    use std::net::SocketAddrV4;

    fn fragments(len: usize) -> Vec<Vec<u8>> {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 5000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 7);
        let payload: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        udp_frames([1; 6], [2; 6], src, dst, &payload, 1500, 9)
            .into_iter()
            .map(|f| f[14..].to_vec())
            .collect()
    }

    #[test]
    fn fragments_in_any_order_make_the_datagram() {
        let frags = fragments(5000);
        let whole_len = 20 + 8 + 5000;
        let mut r = Reassembler::default();
        let order = [2, 0, 3, 1];
        let mut out = None;
        for (n, i) in order.iter().enumerate() {
            let got = r.push(&Ipv4Packet::new_checked(&frags[*i][..]).unwrap());
            assert_eq!(got.is_some(), n == order.len() - 1);
            out = out.or(got);
        }
        let out = out.unwrap();
        assert_eq!(out.len(), whole_len);
        let p = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert!(p.verify_checksum() && !p.more_frags() && p.frag_offset() == 0);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn overlaps_and_duplicates_discard_the_datagram() {
        let frags = fragments(3000);
        let mut r = Reassembler::default();
        r.push(&Ipv4Packet::new_checked(&frags[0][..]).unwrap());
        assert!(r
            .push(&Ipv4Packet::new_checked(&frags[0][..]).unwrap())
            .is_none());
        assert_eq!(r.pending(), 0, "a duplicate (overlap) drops the datagram");
    }

    #[test]
    fn pending_datagrams_are_bounded() {
        let mut r = Reassembler::default();
        for ident in 0..100u16 {
            let mut f = fragments(3000)[0].clone();
            let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
            p.set_ident(ident);
            p.fill_checksum();
            r.push(&Ipv4Packet::new_checked(&f[..]).unwrap());
        }
        assert_eq!(r.pending(), MAX_PENDING);
    }
}
