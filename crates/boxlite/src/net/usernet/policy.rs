//! Where a guest connection or datagram may go. This is the one place that decides which host
//! addresses untrusted guest code can reach.
//!
//! - The gateway (192.168.127.1) serves DNS on port 53 and nothing else: it never maps to the
//!   host's loopback, so services bound to 127.0.0.1 because they are private stay private.
//! - The host alias (192.168.127.254) maps to 127.0.0.1 only when the Box allows host access.
//! - Loopback, unspecified, multicast, broadcast and link-local destinations are refused, as is
//!   everything else inside the Box subnet (nobody else lives there).
//! - Any other IPv4 address is reached from the host, as the host's own programs would.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::net::Topology;

/// The decision for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Our DNS forwarder.
    Dns,
    /// Connect to / send to this host address.
    Host(SocketAddrV4),
    /// Not allowed: TCP gets a reset, UDP is dropped.
    Refuse,
}

/// Decides where guest traffic to `dst` goes.
pub fn target(dst: SocketAddrV4, allow_host: bool) -> Target {
    let ip = *dst.ip();
    if ip == Topology::GATEWAY {
        return if dst.port() == 53 {
            Target::Dns
        } else {
            Target::Refuse
        };
    }
    if ip == Topology::HOST_ALIAS {
        return if allow_host {
            Target::Host(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()))
        } else {
            Target::Refuse
        };
    }
    if in_box_subnet(ip)
        || ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local()
        || ip.octets()[0] == 0
        || dst.port() == 0
    {
        return Target::Refuse;
    }
    Target::Host(dst)
}

/// The address is inside 192.168.127.0/24.
pub fn in_box_subnet(ip: Ipv4Addr) -> bool {
    let mask = u32::from(Topology::NETMASK);
    u32::from(ip) & mask == u32::from(Topology::GATEWAY) & mask
}

/// A source address the guest may use: its own subnet, not one of ours.
pub fn valid_guest_source(ip: Ipv4Addr) -> bool {
    in_box_subnet(ip)
        && ip != Topology::GATEWAY
        && ip != Topology::HOST_ALIAS
        && ip.octets()[3] != 0
        && ip.octets()[3] != 255
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, allow: bool) -> Target {
        target(s.parse().unwrap(), allow)
    }

    #[test]
    fn gateway_never_reaches_host_loopback() {
        for allow in [false, true] {
            assert_eq!(t("192.168.127.1:18555", allow), Target::Refuse);
            assert_eq!(t("192.168.127.1:53", allow), Target::Dns);
            assert_eq!(t("127.0.0.1:22", allow), Target::Refuse);
            assert_eq!(t("192.168.127.7:22", allow), Target::Refuse);
        }
    }

    #[test]
    fn host_alias_only_with_opt_in() {
        assert_eq!(t("192.168.127.254:18555", false), Target::Refuse);
        assert_eq!(
            t("192.168.127.254:18555", true),
            Target::Host("127.0.0.1:18555".parse().unwrap())
        );
        assert_eq!(
            t("10.200.0.2:80", false),
            Target::Host("10.200.0.2:80".parse().unwrap())
        );
    }
}
