//! DNS on the gateway (192.168.127.1:53, UDP) for the backends whose own stack would forward it
//! badly: libslirp (its resolver would sit on the gateway address and capture every connection
//! to it) and passt (Debian 12's passt reaches a loopback resolver only at exactly 127.0.0.1, so
//! hosts with systemd-resolved's 127.0.0.53 got no answers). The frame relay of both picks the
//! guest's queries out of the frame stream ([`query`]) and answers them with usernet's
//! forwarder, from the `--dns` servers or the host's resolvers, on a worker thread each
//! ([`Answerer`]); the answer goes back to the guest as if from the gateway, fragmented when it
//! is larger than the MTU (EDNS answers can be).

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket};
use tracing::warn;

use crate::net::usernet::{dns, packet};
use crate::net::Topology;

/// Queries answered at once at most; more are dropped (the guest's resolver retries).
const MAX_IN_FLIGHT: usize = 64;

/// A UDP query from the guest to the gateway's port 53.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    guest_mac: [u8; 6],
    /// The MAC the guest sent the query to (the backend's gateway MAC); the answer comes from it.
    gateway_mac: [u8; 6],
    guest: SocketAddrV4,
    message: Vec<u8>,
}

/// The DNS query in `frame`, if it is an unfragmented IPv4 UDP datagram to 192.168.127.1:53.
pub(crate) fn query(frame: &[u8]) -> Option<Query> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.dst_addr() != Topology::GATEWAY
        || ip.next_header() != IpProtocol::Udp
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    if udp.dst_port() != 53 {
        return None;
    }
    Some(Query {
        guest_mac: eth.src_addr().0,
        gateway_mac: eth.dst_addr().0,
        guest: SocketAddrV4::new(ip.src_addr(), udp.src_port()),
        message: udp.payload().to_vec(),
    })
}

/// Answers queries on worker threads, a bounded number at a time.
#[derive(Debug)]
pub(crate) struct Answerer {
    upstreams: Vec<SocketAddr>,
    in_flight: Arc<AtomicUsize>,
    ident: Arc<AtomicU16>,
}

impl Answerer {
    /// Forwards to `dns` (the Box's `--dns` servers), or to the host's resolvers when empty.
    pub(crate) fn new(dns: &[SocketAddr]) -> Answerer {
        let upstreams = if dns.is_empty() {
            crate::net::host_resolvers()
        } else {
            dns.to_vec()
        };
        Answerer {
            upstreams,
            in_flight: Arc::new(AtomicUsize::new(0)),
            ident: Arc::new(AtomicU16::new(1)),
        }
    }

    /// Answers `query` on a worker thread and hands the answer's frames to `send` there. False
    /// when the query was dropped (too many in flight, or no thread).
    pub(crate) fn answer(
        &self,
        query: Query,
        send: impl FnOnce(Vec<Vec<u8>>) + Send + 'static,
    ) -> bool {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let upstreams = self.upstreams.clone();
        let in_flight = Arc::clone(&self.in_flight);
        let ident = self.ident.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("gateway-dns".into())
            .spawn(move || {
                if let Some(reply) = dns::answer(&query.message, &upstreams, dns::Transport::Udp) {
                    send(packet::udp_frames(
                        query.gateway_mac,
                        query.guest_mac,
                        SocketAddrV4::new(Topology::GATEWAY, 53),
                        query.guest,
                        &reply,
                        usize::from(Topology::MTU),
                        ident,
                    ));
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = &spawned {
            warn!(error = %e, "cannot start a DNS worker");
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        spawned.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn frame_to(dst: Ipv4Addr, port: u16) -> Vec<u8> {
        packet::udp_frame(
            [2, 0, 0, 0, 0, 2],
            [9, 9, 9, 9, 9, 9],
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 40000),
            SocketAddrV4::new(dst, port),
            b"0123456789abcdef",
        )
    }

    #[test]
    fn only_udp_to_the_gateways_port_53_is_a_query() {
        let q = query(&frame_to(Topology::GATEWAY, 53)).expect("a query");
        assert_eq!(
            q.gateway_mac, [9; 6],
            "answered from the MAC it was sent to"
        );
        assert_eq!(q.guest.port(), 40000);
        assert_eq!(q.message, b"0123456789abcdef");
        assert!(query(&frame_to(Topology::GATEWAY, 5353)).is_none());
        assert!(query(&frame_to(Ipv4Addr::new(10, 0, 0, 53), 53)).is_none());
    }
}
