//! Building the frames usernet sends outside smoltcp's sockets: UDP datagrams (DHCP, DNS, NAT
//! replies, forwards), TCP resets for refused connects and ICMP echo replies, each a complete
//! Ethernet II + IPv4 frame with correct checksums (RFC 791, RFC 768, RFC 793, RFC 792).
//! Datagrams bigger than one frame are split into IPv4 fragments (RFC 791 section 2.3).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// The fields of an incoming TCP segment needed to answer it with a reset.
#[derive(Debug, Clone, Copy)]
pub struct SegmentId {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub payload_len: usize,
}

fn ipv4_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    emit_payload: impl FnOnce(&mut [u8], &Ipv4Repr),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    emit_payload(packet.payload_mut(), &ip);
    buf
}

/// A UDP datagram from `src` to `dst`.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let len = udp.header_len() + payload.len();
    ipv4_frame(
        src_mac,
        dst_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        len,
        |buf, _| {
            let mut p = UdpPacket::new_unchecked(buf);
            udp.emit(
                &mut p,
                &(*src.ip()).into(),
                &(*dst.ip()).into(),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// A UDP datagram from `src` to `dst` as one frame, or as IPv4 fragments of at most `mtu`
/// bytes of IP packet each when it does not fit. `ident` tells the datagrams apart.
pub fn udp_frames(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    mtu: usize,
    ident: u16,
) -> Vec<Vec<u8>> {
    let whole = udp_frame(src_mac, dst_mac, src, dst, payload);
    if whole.len() - 14 <= mtu {
        return vec![whole];
    }
    // The UDP header and payload, checksummed once over the whole datagram, then cut.
    let datagram = &whole[14 + 20..];
    let chunk = (mtu - 20) / 8 * 8;
    let mut frames = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let piece = &datagram[offset..(offset + chunk).min(datagram.len())];
        let mut frame = ipv4_frame(
            src_mac,
            dst_mac,
            *src.ip(),
            *dst.ip(),
            IpProtocol::Udp,
            piece.len(),
            |buf, _| buf.copy_from_slice(piece),
        );
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_ident(ident);
        ip.set_dont_frag(false);
        ip.set_more_frags(offset + piece.len() < datagram.len());
        ip.set_frag_offset(offset as u16);
        ip.fill_checksum();
        frames.push(frame);
        offset += piece.len();
    }
    frames
}

/// The RST answering `seg` (RFC 793, "Reset Generation": no connection exists).
pub fn tcp_reset(src_mac: [u8; 6], dst_mac: [u8; 6], seg: &SegmentId) -> Vec<u8> {
    let (seq, ack) = match seg.ack {
        Some(ack) => (ack, None),
        None => {
            let len = seg.payload_len as u32 + u32::from(seg.syn) + u32::from(seg.fin);
            (0, Some(seg.seq.wrapping_add(len)))
        }
    };
    let tcp = TcpRepr {
        src_port: seg.dst.port(),
        dst_port: seg.src.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (*seg.dst.ip(), *seg.src.ip());
    ipv4_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        IpProtocol::Tcp,
        tcp.header_len(),
        |buf, _| {
            let mut p = TcpPacket::new_unchecked(buf);
            tcp.emit(
                &mut p,
                &src.into(),
                &dst.into(),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// An ICMP message (already complete apart from its checksum) from `src` to `dst`.
pub fn icmp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp: &[u8],
) -> Vec<u8> {
    ipv4_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        IpProtocol::Icmp,
        icmp.len(),
        |buf, _| {
            buf.copy_from_slice(icmp);
            let mut p = Icmpv4Packet::new_unchecked(buf);
            p.fill_checksum();
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_checksums_verify() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4000);
        let f = udp_frame([1; 6], [2; 6], src, dst, b"hello");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&src.ip().to_owned().into(), &dst.ip().to_owned().into()));
        assert_eq!(udp.payload(), b"hello");
    }

    #[test]
    fn big_datagrams_become_fragments_that_reassemble() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4000);
        let payload: Vec<u8> = (0..4000).map(|i| (i % 251) as u8).collect();
        let frames = udp_frames([1; 6], [2; 6], src, dst, &payload, 1500, 77);
        assert_eq!(frames.len(), 3);
        let mut datagram = vec![0u8; 8 + payload.len()];
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= 1514);
            let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.ident(), 77);
            assert_eq!(ip.more_frags(), i < 2);
            let off = usize::from(ip.frag_offset());
            datagram[off..off + ip.payload().len()].copy_from_slice(ip.payload());
        }
        let udp = UdpPacket::new_checked(&datagram[..]).unwrap();
        assert!(udp.verify_checksum(&(*src.ip()).into(), &(*dst.ip()).into()));
        assert_eq!(udp.payload(), &payload[..]);
        let small = udp_frames([1; 6], [2; 6], src, dst, b"x", 1500, 1);
        assert_eq!(small, vec![udp_frame([1; 6], [2; 6], src, dst, b"x")]);
    }

    #[test]
    fn reset_acknowledges_the_syn() {
        let seg = SegmentId {
            src: "192.168.127.2:40000".parse().unwrap(),
            dst: "192.168.127.1:22".parse().unwrap(),
            seq: 1000,
            ack: None,
            syn: true,
            fin: false,
            payload_len: 0,
        };
        let f = tcp_reset([1; 6], [2; 6], &seg);
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
        assert_eq!((tcp.src_port(), tcp.dst_port()), (22, 40000));
    }
}
