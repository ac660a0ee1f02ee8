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

/// One guest ICMP echo conversation through an unprivileged ping socket.
#[derive(Debug)]
pub struct IcmpFlow {
    pub guest: std::net::Ipv4Addr,
    pub remote: std::net::Ipv4Addr,
    /// The identifier the guest used; the kernel rewrites it on the way out.
    pub guest_id: u16,
    pub socket: UdpSocket,
    pub last: Instant,
}

/// Opens an unprivileged ICMP echo ("ping") socket; fails where `ping_group_range` forbids it.
pub fn ping_socket() -> std::io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh datagram socket we own; std's UdpSocket only sends and receives
    // datagrams on it, which is what a ping socket supports.
    let std_sock = unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Ok(UdpSocket::from_std(std_sock))
}

/// One host → guest UDP forward.
#[derive(Debug)]
pub struct UdpForward {
    pub forward: PortForward,
    pub socket: UdpSocket,
    /// Host peer → (gateway port it appears from in the guest, last activity).
    pub peers: HashMap<SocketAddr, (u16, Instant)>,
}
