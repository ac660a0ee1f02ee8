//! The guest agent's DHCP client (RFC 2131, options from RFC 2132): finds the NIC with the MAC
//! the host chose, brings it up, runs DISCOVER/OFFER/REQUEST/ACK and applies the lease
//! (address, netmask, default route, MTU) with the classic interface and route ioctls.
//!
//! Before the lease the interface has no address, so the client asks servers to broadcast their
//! replies (the BROADCAST flag) and listens on a UDP socket bound to port 68 and to the device;
//! every backend (usernet, libslirp, passt) honours the flag. Retransmissions back off from 1 s
//! to 4 s until the caller's deadline. Renewal is not needed: the agent lives as long as the Box
//! and the backends hand out leases far longer than it usually runs; a lease that expires
//! anyway stays configured (no backend takes addresses back).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use boxlite_protocol::NetworkSetup;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

/// What the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    ip: Ipv4Addr,
    netmask: Ipv4Addr,
    router: Option<Ipv4Addr>,
    mtu: Option<u16>,
}

/// Brings the NIC with `setup.mac` up with a DHCP lease; returns the leased address.
pub fn configure(setup: &NetworkSetup) -> Result<Option<String>, String> {
    let mac = parse_mac(&setup.mac)?;
    let ifname = find_interface(&setup.mac)?;
    let ctl = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("control socket: {e}"))?;
    set_up(&ctl, &ifname).map_err(|e| format!("bringing {ifname} up: {e}"))?;

    let sock = client_socket(&ifname).map_err(|e| format!("DHCP socket on {ifname}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(setup.dhcp_timeout_secs.max(1));
    let lease = obtain(&sock, mac, deadline)
        .map_err(|e| format!("no DHCP lease on {ifname} ({}): {e}", setup.mac))?;
    apply(&ctl, &ifname, &lease).map_err(|e| format!("configuring {ifname}: {e}"))?;
    Ok(Some(lease.ip.to_string()))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC address {s:?}"))?;
    parts
        .try_into()
        .map_err(|_| format!("bad MAC address {s:?}"))
}

fn find_interface(mac: &str) -> Result<String, String> {
    let want = mac.to_ascii_lowercase();
    let entries = std::fs::read_dir("/sys/class/net").map_err(|e| format!("/sys/class/net: {e}"))?;
    for e in entries.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().to_ascii_lowercase() == want {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no network interface has MAC {mac}"))
}

fn client_socket(ifname: &str) -> io::Result<UdpSocket> {
    let sock = socket2_like_bind(ifname)?;
    sock.set_broadcast(true)?;
    Ok(sock)
}

/// A UDP socket on 0.0.0.0:68 bound to `ifname` (SO_BINDTODEVICE before bind, SO_REUSEADDR).
fn socket2_like_bind(ifname: &str) -> io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own from here on.
    let sock: UdpSocket = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the option value is the interface name's bytes and its length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 68u16.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn xid_seed(mac: [u8; 6]) -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ t
}

fn request_msg(mac: [u8; 6], xid: u32, kind: MessageType, offer: Option<&Message>) -> Vec<u8> {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_xid(xid)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(&mac);
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::InterfaceMtu,
        OptionCode::AddressLeaseTime,
    ]));
    if let Some(offer) = offer {
        opts.insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        if let Some(DhcpOption::ServerIdentifier(id)) =
            offer.opts().get(OptionCode::ServerIdentifier)
        {
            opts.insert(DhcpOption::ServerIdentifier(*id));
        }
    }
    m.to_vec().expect("a DHCP request we built always encodes")
}

/// Waits for a reply with `xid` of one of `kinds` until `until`.
fn wait_reply(sock: &UdpSocket, xid: u32, kinds: &[MessageType], until: Instant) -> Option<Message> {
    let mut buf = [0u8; 1500];
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
            continue;
        };
        if m.opcode() != Opcode::BootReply || m.xid() != xid {
            continue;
        }
        match m.opts().msg_type() {
            Some(k) if kinds.contains(&k) => return Some(m),
            _ => continue,
        }
    }
}

fn obtain(sock: &UdpSocket, mac: [u8; 6], deadline: Instant) -> Result<Lease, String> {
    let server: SocketAddr = (Ipv4Addr::BROADCAST, 67).into();
    let mut xid = xid_seed(mac);
    let mut wait = Duration::from_secs(1);
    let mut last_err = String::from("no answer from any DHCP server");
    while Instant::now() < deadline {
        xid = xid.wrapping_add(1);
        let step_end = (Instant::now() + wait).min(deadline);
        sock.send_to(&request_msg(mac, xid, MessageType::Discover, None), server)
            .map_err(|e| format!("sending DISCOVER: {e}"))?;
        let Some(offer) = wait_reply(sock, xid, &[MessageType::Offer], step_end) else {
            wait = (wait * 2).min(Duration::from_secs(4));
            continue;
        };
        let request = request_msg(mac, xid, MessageType::Request, Some(&offer));
        for _ in 0..3 {
            sock.send_to(&request, server)
                .map_err(|e| format!("sending REQUEST: {e}"))?;
            let until = (Instant::now() + Duration::from_secs(1)).min(deadline);
            match wait_reply(sock, xid, &[MessageType::Ack, MessageType::Nak], until) {
                Some(ack) if ack.opts().msg_type() == Some(MessageType::Ack) => {
                    return lease_from(&ack);
                }
                Some(_) => {
                    last_err = format!("the server refused {} (NAK)", offer.yiaddr());
                    break;
                }
                None => {}
            }
        }
    }
    Err(last_err)
}

fn lease_from(ack: &Message) -> Result<Lease, String> {
    let ip = ack.yiaddr();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!("the server granted an unusable address {ip}"));
    }
    let netmask = match ack.opts().get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => *m,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let router = match ack.opts().get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let mtu = match ack.opts().get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) if (576..=65535).contains(m) => Some(*m),
        _ => None,
    };
    Ok(Lease {
        ip,
        netmask,
        router,
        mtu,
    })
}

fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &UdpSocket, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to the structure `request` expects.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is meant to be used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_up(sock: &UdpSocket, ifname: &str) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    ioctl(sock, libc::SIOCGIFFLAGS, (&mut req as *mut libc::ifreq).cast())?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(sock, libc::SIOCSIFFLAGS, (&mut req as *mut libc::ifreq).cast())
}

fn apply(sock: &UdpSocket, ifname: &str, lease: &Lease) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr(lease.ip);
    ioctl(sock, libc::SIOCSIFADDR, (&mut req as *mut libc::ifreq).cast())?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr(lease.netmask);
    ioctl(sock, libc::SIOCSIFNETMASK, (&mut req as *mut libc::ifreq).cast())?;
    if let Some(mtu) = lease.mtu {
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        ioctl(sock, libc::SIOCSIFMTU, (&mut req as *mut libc::ifreq).cast())?;
    }
    if let Some(router) = lease.router {
        let mut name = ifname.as_bytes().to_vec();
        name.push(0);
        // SAFETY: rtentry is plain data; all-zero is a valid starting value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(router);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        rt.rt_dev = name.as_mut_ptr().cast();
        match ioctl(sock, libc::SIOCADDRT, (&mut rt as *mut libc::rtentry).cast()) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            r => r?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_broadcast_flag_and_the_offer() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let d = request_msg(mac, 7, MessageType::Discover, None);
        let d = Message::decode(&mut Decoder::new(&d)).unwrap();
        assert!(d.flags().broadcast());
        assert_eq!(d.chaddr(), &mac);
        let mut offer = Message::default();
        offer.set_yiaddr(Ipv4Addr::new(192, 168, 127, 2));
        offer
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 127, 1)));
        let r = request_msg(mac, 7, MessageType::Request, Some(&offer));
        let r = Message::decode(&mut Decoder::new(&r)).unwrap();
        assert_eq!(
            r.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 127, 2)))
        );
        assert_eq!(
            r.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 127, 1)))
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(parse_mac("52:54:00").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
    }
}
