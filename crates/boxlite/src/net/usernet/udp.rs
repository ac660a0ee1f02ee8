//! UDP state of usernet: NAT'ed guest flows (one connected host socket per guest
//! source/destination pair, dropped after an idle timeout) and host → guest UDP port forwards
//! (one bound host socket per forward; each host peer gets a gateway port of its own so the
//! guest's replies find their way back).

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Instant;

use mio::net::UdpSocket;

use crate::net::PortForward;

/// Most NAT'ed UDP flows at once; the least recently used goes when a new one needs room.
pub const MAX_FLOWS: usize = 512;
/// Largest datagram we can hand the guest without IP fragmentation.
pub const MAX_PAYLOAD: usize = 1500 - 20 - 8;

/// One guest UDP flow through a host socket.
#[derive(Debug)]
pub struct UdpFlow {
    /// The guest's endpoint.
    pub guest: SocketAddrV4,
    /// The endpoint the guest sent to (replies come from it).
    pub remote: SocketAddrV4,
    pub socket: UdpSocket,
    pub last: Instant,
}

/// One host → guest UDP forward.
#[derive(Debug)]
pub struct UdpForward {
    pub forward: PortForward,
    pub socket: UdpSocket,
    /// Host peer → (gateway port it appears from in the guest, last activity).
    pub peers: HashMap<SocketAddr, (u16, Instant)>,
}
