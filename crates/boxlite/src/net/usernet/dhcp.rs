//! The usernet DHCP server (RFC 2131 as real clients use it, options from RFC 2132).
//!
//! One Box has one NIC, but nothing stops a guest from inventing more MACs, so leases are kept per
//! client hardware address over a small pool starting at the guest address. The server answers
//! DISCOVER with OFFER, REQUEST with ACK or NAK, honours RELEASE and INFORM, and ignores requests
//! that selected another server. NAKs are always broadcast (RFC 2131 4.3.2): the client has no
//! usable address to unicast to. Malformed packets produce no reply; parsing is bounds-checked by
//! `dhcproto`, which never reads past the slice it is given.
//!
//! Leases are not reclaimed when they expire: a Box has one NIC and the pool is far larger, so a
//! client keeps its address across reboots of the guest (INIT-REBOOT is ACKed).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use tracing::debug;

use crate::net::Topology;

/// Lease time handed out; clients renew at half of it.
pub const LEASE_SECS: u32 = 3600;
/// Addresses the server hands out: the guest address and the ones after it.
const POOL_SIZE: u8 = 32;

/// Where a reply must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Ethernet and IP broadcast.
    Broadcast,
    /// Unicast to this IP at this MAC.
    Unicast(Ipv4Addr, [u8; 6]),
}

/// A reply to send from the server's port 67 to the client's port 68.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub to: Destination,
    /// The reply is an ACK that grants a lease.
    pub is_lease: bool,
}

/// Options every OFFER/ACK carries.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    pub server: Ipv4Addr,
    pub first: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u16,
    pub hostname: Option<String>,
    pub domain: String,
}

impl DhcpConfig {
    /// The Box topology's configuration.
    pub fn boxlite(hostname: Option<String>) -> DhcpConfig {
        DhcpConfig {
            server: Topology::GATEWAY,
            first: Topology::GUEST,
            netmask: Topology::NETMASK,
            router: Topology::GATEWAY,
            dns: vec![Topology::GATEWAY],
            mtu: Topology::MTU,
            hostname,
            domain: Topology::DOMAIN.to_string(),
        }
    }
}

/// The server's state: the lease table.
#[derive(Debug)]
pub struct DhcpServer {
    config: DhcpConfig,
    leases: HashMap<[u8; 6], Ipv4Addr>,
}

impl DhcpServer {
    pub fn new(config: DhcpConfig) -> DhcpServer {
        DhcpServer {
            config,
            leases: HashMap::new(),
        }
    }

    /// Handles one BOOTP payload received on port 67. `None`: nothing to send.
    pub fn handle(&mut self, payload: &[u8]) -> Option<Reply> {
        let msg = match Message::decode(&mut Decoder::new(payload)) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, len = payload.len(), "dropping malformed DHCP packet");
                return None;
            }
        };
        if msg.opcode() != Opcode::BootRequest
            || msg.htype() != HType::Eth
            || msg.hlen() != 6
            || msg.chaddr().len() < 6
            || !msg.giaddr().is_unspecified()
        {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&msg.chaddr()[..6]);
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };

        match msg.opts().msg_type()? {
            MessageType::Discover => {
                let ip = self.pick(mac, requested)?;
                Some(self.reply(&msg, MessageType::Offer, ip))
            }
            MessageType::Request => self.request(&msg, mac, requested, server_id),
            MessageType::Release => {
                if self.leases.get(&mac) == Some(&msg.ciaddr()) {
                    self.leases.remove(&mac);
                }
                None
            }
            MessageType::Inform => Some(self.reply(&msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED)),
            _ => None,
        }
    }

    /// The address leased to `mac`, if any.
    pub fn lease_of(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.leases.get(mac).copied()
    }

    fn request(
        &mut self,
        msg: &Message,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        server_id: Option<Ipv4Addr>,
    ) -> Option<Reply> {
        if let Some(id) = server_id {
            if id != self.config.server {
                // SELECTING another server's offer: forget ours, say nothing.
                return None;
            }
        }
        let wanted = match requested {
            Some(ip) => ip,
            None if !msg.ciaddr().is_unspecified() => msg.ciaddr(),
            None => return Some(self.nak(msg)),
        };
        if self.grantable(mac, wanted) {
            self.leases.insert(mac, wanted);
            let mut reply = self.reply(msg, MessageType::Ack, wanted);
            reply.is_lease = true;
            Some(reply)
        } else {
            Some(self.nak(msg))
        }
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let first = u32::from(self.config.first);
        (first..first + u32::from(POOL_SIZE)).contains(&u32::from(ip))
    }

    fn grantable(&self, mac: [u8; 6], ip: Ipv4Addr) -> bool {
        self.in_pool(ip) && self.leases.iter().all(|(m, l)| *m == mac || *l != ip)
    }

    fn pick(&self, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.leases.get(&mac) {
            return Some(*ip);
        }
        if let Some(ip) = requested.filter(|ip| self.grantable(mac, *ip)) {
            return Some(ip);
        }
        let first = u32::from(self.config.first);
        (first..first + u32::from(POOL_SIZE))
            .map(Ipv4Addr::from)
            .find(|ip| self.grantable(mac, *ip))
    }

    fn reply(&self, req: &Message, kind: MessageType, yiaddr: Ipv4Addr) -> Reply {
        let c = &self.config;
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_ciaddr(req.ciaddr())
            .set_yiaddr(yiaddr)
            .set_siaddr(c.server)
            .set_chaddr(req.chaddr());
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(c.server));
        opts.insert(DhcpOption::SubnetMask(c.netmask));
        opts.insert(DhcpOption::Router(vec![c.router]));
        opts.insert(DhcpOption::DomainNameServer(c.dns.clone()));
        opts.insert(DhcpOption::InterfaceMtu(c.mtu));
        opts.insert(DhcpOption::DomainName(c.domain.clone()));
        if let Some(h) = &c.hostname {
            opts.insert(DhcpOption::Hostname(h.clone()));
        }
        if kind != MessageType::Ack || !yiaddr.is_unspecified() {
            opts.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
            opts.insert(DhcpOption::Renewal(LEASE_SECS / 2));
            opts.insert(DhcpOption::Rebinding(LEASE_SECS / 8 * 7));
        }
        let to = if !req.ciaddr().is_unspecified() {
            Destination::Unicast(req.ciaddr(), mac6(req.chaddr()))
        } else if req.flags().broadcast() || yiaddr.is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast(yiaddr, mac6(req.chaddr()))
        };
        Reply {
            payload: m.to_vec().expect("a DHCP reply we built always encodes"),
            to,
            is_lease: false,
        }
    }

    fn nak(&self, req: &Message) -> Reply {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_xid(req.xid())
            .set_flags(Flags::default().set_broadcast())
            .set_chaddr(req.chaddr());
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Nak));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.config.server));
        Reply {
            payload: m.to_vec().expect("a DHCP NAK we built always encodes"),
            to: Destination::Broadcast,
            is_lease: false,
        }
    }
}

fn mac6(chaddr: &[u8]) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&chaddr[..6]);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn request(kind: MessageType, xid: u32, opts: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Vec<u8> {
        let mut m = Message::default();
        m.set_xid(xid).set_chaddr(&MAC).set_ciaddr(ciaddr);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m.to_vec().unwrap()
    }

    fn decode(r: &Reply) -> Message {
        Message::decode(&mut Decoder::new(&r.payload)).unwrap()
    }

    #[test]
    fn full_exchange_then_renewal() {
        let mut s = DhcpServer::new(DhcpConfig::boxlite(Some("box1".into())));
        let offer = s
            .handle(&request(
                MessageType::Discover,
                1,
                vec![],
                Ipv4Addr::UNSPECIFIED,
            ))
            .unwrap();
        let o = decode(&offer);
        assert_eq!(o.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(o.yiaddr(), Topology::GUEST);
        assert_eq!(offer.to, Destination::Unicast(Topology::GUEST, MAC));
        let ack = s
            .handle(&request(
                MessageType::Request,
                2,
                vec![
                    DhcpOption::RequestedIpAddress(Topology::GUEST),
                    DhcpOption::ServerIdentifier(Topology::GATEWAY),
                ],
                Ipv4Addr::UNSPECIFIED,
            ))
            .unwrap();
        let a = decode(&ack);
        assert_eq!(a.opts().msg_type(), Some(MessageType::Ack));
        assert!(ack.is_lease);
        assert_eq!(
            a.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Topology::GATEWAY]))
        );
        assert_eq!(
            a.opts().get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1500))
        );
        assert_eq!(
            a.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("box1".into()))
        );
        // RENEWING: ciaddr set, no option 50, unicast back.
        let renew = s
            .handle(&request(MessageType::Request, 3, vec![], Topology::GUEST))
            .unwrap();
        assert_eq!(decode(&renew).opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(renew.to, Destination::Unicast(Topology::GUEST, MAC));
    }

    #[test]
    fn renewal_of_a_foreign_address_is_naked_by_broadcast() {
        let mut s = DhcpServer::new(DhcpConfig::boxlite(None));
        let nak = s
            .handle(&request(
                MessageType::Request,
                9,
                vec![],
                Ipv4Addr::new(10, 0, 0, 5),
            ))
            .unwrap();
        assert_eq!(decode(&nak).opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(decode(&nak).yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(nak.to, Destination::Broadcast);
    }

    #[test]
    fn every_truncation_of_a_request_is_survived() {
        let full = request(
            MessageType::Discover,
            5,
            vec![DhcpOption::Hostname("x".repeat(40))],
            Ipv4Addr::UNSPECIFIED,
        );
        let mut s = DhcpServer::new(DhcpConfig::boxlite(None));
        for cut in 0..full.len() {
            let _ = s.handle(&full[..cut]);
        }
    }
}
