//! The host alias 192.168.127.254 for the stacks that map only their gateway address to the
//! host's loopback: libslirp (which refuses other addresses of its network) and passt (which
//! sends every other address, the alias included, to the real network).
//!
//! Both backends run every frame through [`HostAlias`]: TCP and UDP from the guest to the alias
//! are rewritten to the gateway and the replies of those flows are rewritten back, so the guest
//! only ever sees the alias; that happens only when the Box allows host access. Without it,
//! libslirp refuses both addresses itself, promptly (`disable_host_loopback`, and no mapping
//! for other addresses of its network). passt has no such switch (with `--no-map-gw` the
//! gateway becomes an address of the real network), so for passt without host access frames
//! to the alias are dropped instead, and so is everything to the gateway but DNS and the
//! replies of flows the gateway opened (passt's port forwards reach the guest from the
//! gateway). Checksums are recomputed for the rewritten IPv4 header and the TCP or UDP segment.
//!
//! Known shortcomings: only unfragmented TCP and UDP are rewritten (ICMP to the alias, e.g.
//! ping, and IP fragments are dropped), and dropped connects to the alias are not refused: the
//! guest's connect times out.

use std::collections::HashSet;
use std::sync::Mutex;

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

use crate::net::Topology;

/// Flows remembered at most; past this the table starts over (a reply of a forgotten flow then
/// reaches the guest from the gateway, which its socket ignores).
const MAX_FLOWS: usize = 8192;

/// What to do with a frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Drop,
}

/// A flow to the alias: (IP protocol, guest port, host port).
type FlowKey = (u8, u16, u16);

#[derive(Debug)]
pub(crate) struct HostAlias {
    /// Rewrite the alias to the gateway (else drop frames to it).
    rewrite: bool,
    /// Drop frames to the gateway other than DNS and the replies of flows the gateway opened
    /// (passt's port forwards come from the gateway).
    gateway_dns_only: bool,
    flows: Mutex<HashSet<FlowKey>>,
    /// Flows from the gateway to the guest (only kept with `gateway_dns_only`).
    from_gateway: Mutex<HashSet<FlowKey>>,
}

fn remember(set: &Mutex<HashSet<FlowKey>>, key: FlowKey) {
    let mut flows = set.lock().expect("host alias flows lock");
    if flows.len() >= MAX_FLOWS {
        flows.clear();
    }
    flows.insert(key);
}

/// The IPv4 packet of an Ethernet frame, with its protocol and ports when it is an
/// unfragmented TCP or UDP packet.
fn parse(frame: &[u8]) -> Option<(Ipv4Packet<&[u8]>, Option<FlowKey>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
    let whole = !ip.more_frags() && ip.frag_offset() == 0;
    let ports = match ip.next_header() {
        IpProtocol::Tcp if whole => TcpPacket::new_checked(ip.payload())
            .ok()
            .map(|t| (6, t.src_port(), t.dst_port())),
        IpProtocol::Udp if whole => UdpPacket::new_checked(ip.payload())
            .ok()
            .map(|u| (17, u.src_port(), u.dst_port())),
        _ => None,
    };
    Some((ip, ports))
}

/// Sets the source or destination of the frame's IPv4 packet and fixes the checksums.
fn rewrite(frame: &mut [u8], src: Option<std::net::Ipv4Addr>, dst: Option<std::net::Ipv4Addr>) {
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
    if let Some(a) = src {
        ip.set_src_addr(a);
    }
    if let Some(a) = dst {
        ip.set_dst_addr(a);
    }
    ip.fill_checksum();
    let (s, d) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    let proto = ip.next_header();
    let len = usize::from(ip.total_len()).saturating_sub(usize::from(ip.header_len()));
    let payload = ip.payload_mut();
    let payload_len = len.min(payload.len());
    let payload = &mut payload[..payload_len];
    match proto {
        IpProtocol::Tcp => TcpPacket::new_unchecked(payload).fill_checksum(&s, &d),
        IpProtocol::Udp => {
            let mut udp = UdpPacket::new_unchecked(payload);
            if udp.checksum() != 0 {
                udp.fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

impl HostAlias {
    /// For a stack that refuses the gateway and the alias itself without host access
    /// (libslirp): rewrite only with host access; without it the stack's refusal reaches the
    /// guest as it is (a rewritten refusal, an ICMP error quoting the gateway, would not match
    /// the guest's socket, which would hang).
    pub(crate) fn for_policed_gateway(allow_host: bool) -> HostAlias {
        HostAlias {
            rewrite: allow_host,
            gateway_dns_only: false,
            flows: Mutex::default(),
            from_gateway: Mutex::default(),
        }
    }

    /// For a stack whose gateway leads to the host's loopback exactly when `allow_host`, and to
    /// the real network otherwise (passt with or without `--no-map-gw`).
    pub(crate) fn for_open_gateway(allow_host: bool) -> HostAlias {
        HostAlias {
            rewrite: allow_host,
            gateway_dns_only: !allow_host,
            flows: Mutex::default(),
            from_gateway: Mutex::default(),
        }
    }

    /// Applies the policy to a frame from the guest, rewriting it in place when it goes to
    /// the alias.
    pub(crate) fn outbound(&self, frame: &mut [u8]) -> Verdict {
        let Some((ip, ports)) = parse(frame) else {
            return Verdict::Pass;
        };
        let dst = ip.dst_addr();
        if dst == Topology::GATEWAY {
            let allowed = !self.gateway_dns_only
                || ports.is_some_and(|key| {
                    key.2 == 53
                        || self
                            .from_gateway
                            .lock()
                            .expect("host alias flows lock")
                            .contains(&key)
                });
            return if allowed {
                Verdict::Pass
            } else {
                Verdict::Drop
            };
        }
        if dst != Topology::HOST_ALIAS {
            return Verdict::Pass;
        }
        if !self.rewrite {
            // passt would send it to the real network; libslirp refuses it itself.
            return if self.gateway_dns_only {
                Verdict::Drop
            } else {
                Verdict::Pass
            };
        }
        let Some(key) = ports else {
            return Verdict::Drop;
        };
        remember(&self.flows, key);
        rewrite(frame, None, Some(Topology::GATEWAY));
        Verdict::Pass
    }

    /// Rewrites a frame to the guest that answers a flow to the alias so that it comes from
    /// the alias.
    pub(crate) fn inbound(&self, frame: &mut [u8]) {
        let Some((ip, Some((proto, src_port, dst_port)))) = parse(frame) else {
            return;
        };
        if ip.src_addr() != Topology::GATEWAY {
            return;
        }
        if self.gateway_dns_only {
            remember(&self.from_gateway, (proto, dst_port, src_port));
        }
        if !self.rewrite {
            return;
        }
        let known = self
            .flows
            .lock()
            .expect("host alias flows lock")
            .contains(&(proto, dst_port, src_port));
        if known {
            rewrite(frame, Some(Topology::HOST_ALIAS), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        crate::net::usernet::packet::udp_frame(
            Topology::GATEWAY_MAC,
            Topology::GUEST_MAC,
            src,
            dst,
            b"hello",
        )
    }

    fn addrs_and_checksums_ok(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        assert!(udp.verify_checksum(&IpAddress::Ipv4(s), &IpAddress::Ipv4(d)));
        (s, d)
    }

    #[test]
    fn alias_flows_go_to_the_gateway_and_come_back_from_the_alias() {
        let nat = HostAlias::for_open_gateway(true);
        let guest = SocketAddrV4::new(Topology::GUEST, 40000);
        let mut out = udp(guest, SocketAddrV4::new(Topology::HOST_ALIAS, 5000));
        assert_eq!(nat.outbound(&mut out), Verdict::Pass);
        assert_eq!(
            addrs_and_checksums_ok(&out),
            (Topology::GUEST, Topology::GATEWAY)
        );

        let mut back = udp(SocketAddrV4::new(Topology::GATEWAY, 5000), guest);
        nat.inbound(&mut back);
        assert_eq!(
            addrs_and_checksums_ok(&back),
            (Topology::HOST_ALIAS, Topology::GUEST)
        );

        let mut dns = udp(SocketAddrV4::new(Topology::GATEWAY, 53), guest);
        nat.inbound(&mut dns);
        assert_eq!(
            addrs_and_checksums_ok(&dns).0,
            Topology::GATEWAY,
            "not a flow to the alias"
        );
    }

    #[test]
    fn without_host_access_the_alias_and_the_gateway_lead_nowhere() {
        let nat = HostAlias::for_open_gateway(false);
        let guest = SocketAddrV4::new(Topology::GUEST, 40000);
        let mut f = udp(guest, SocketAddrV4::new(Topology::HOST_ALIAS, 5000));
        assert_eq!(nat.outbound(&mut f), Verdict::Drop);
        let mut f = udp(guest, SocketAddrV4::new(Topology::GATEWAY, 5000));
        assert_eq!(nat.outbound(&mut f), Verdict::Drop);
        let mut f = udp(guest, SocketAddrV4::new(Topology::GATEWAY, 53));
        assert_eq!(nat.outbound(&mut f), Verdict::Pass, "DNS");
        let mut f = udp(guest, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000));
        assert_eq!(nat.outbound(&mut f), Verdict::Pass);
        let mut forwarded = udp(SocketAddrV4::new(Topology::GATEWAY, 41000), guest);
        nat.inbound(&mut forwarded);
        let mut f = udp(guest, SocketAddrV4::new(Topology::GATEWAY, 41000));
        assert_eq!(
            nat.outbound(&mut f),
            Verdict::Pass,
            "replies to what the gateway sent (passt's forwards)"
        );

        let nat = HostAlias::for_policed_gateway(false);
        let mut f = udp(guest, SocketAddrV4::new(Topology::HOST_ALIAS, 5000));
        assert_eq!(nat.outbound(&mut f), Verdict::Pass, "the stack refuses it");
        assert_eq!(addrs_and_checksums_ok(&f).1, Topology::HOST_ALIAS);
        let mut f = udp(guest, SocketAddrV4::new(Topology::GATEWAY, 5000));
        assert_eq!(nat.outbound(&mut f), Verdict::Pass, "the stack refuses it");
    }
}
