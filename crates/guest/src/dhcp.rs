//! The guest agent's DHCP client (RFC 2131, options from RFC 2132): finds the NIC with the MAC
//! the host chose, brings it up, runs DISCOVER/OFFER/REQUEST/ACK and applies the lease
//! (address, netmask, default route, MTU) with the classic interface and route ioctls.
//!
//! Before the lease the interface has no address, so the kernel would drop a reply unicast to
//! the offered address before any UDP socket saw it, and not every server honours the BROADCAST
//! flag (passt unicasts). Requests therefore go out through a UDP socket bound to port 68 and to
//! the device, and replies are read from an `AF_PACKET` socket on the device, which sees them
//! whatever their destination; the IPv4 and UDP headers are checked by hand. Retransmissions back off from 1 s
//! to 4 s until the caller's deadline. Renewal is not needed: the agent lives as long as the Box
//! and the backends hand out leases far longer than it usually runs; a lease that expires
//! anyway stays configured (no backend takes addresses back).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    let rx = packet_socket(&ifname).map_err(|e| format!("packet socket on {ifname}: {e}"))?;
    let lease = obtain(&sock, &rx, mac, deadline)
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
    let entries =
        std::fs::read_dir("/sys/class/net").map_err(|e| format!("/sys/class/net: {e}"))?;
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
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
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

/// A packet socket on `ifname` receiving every IPv4 packet (without the Ethernet header).
fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: name is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as libc::c_int;
    // SAFETY: sll is a valid sockaddr_ll of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The UDP payload of an IPv4 packet addressed to port 68, if it is one. Never reads past `ip`.
fn dhcp_client_payload(ip: &[u8]) -> Option<&[u8]> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let flags_frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ihl < 20 || total < ihl + 8 || flags_frag & 0x3fff != 0 {
        return None; // bad header, or a fragment
    }
    let udp = &ip[ihl..total];
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if dst_port != 68 || udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    Some(&udp[8..udp_len])
}

/// Waits for a reply with `xid` of one of `kinds` until `until`.
fn wait_reply(rx: &OwnedFd, xid: u32, kinds: &[MessageType], until: Instant) -> Option<Message> {
    let mut buf = [0u8; 2048];
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd {
            fd: rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
        // SAFETY: pfd is one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let Some(payload) = dhcp_client_payload(&buf[..n as usize]) else {
            continue;
        };
        let Ok(m) = Message::decode(&mut Decoder::new(payload)) else {
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

fn obtain(
    sock: &UdpSocket,
    rx: &OwnedFd,
    mac: [u8; 6],
    deadline: Instant,
) -> Result<Lease, String> {
    let server: SocketAddr = (Ipv4Addr::BROADCAST, 67).into();
    let mut xid = xid_seed(mac);
    let mut wait = Duration::from_secs(1);
    let mut last_err = String::from("no answer from any DHCP server");
    while Instant::now() < deadline {
        xid = xid.wrapping_add(1);
        let step_end = (Instant::now() + wait).min(deadline);
        sock.send_to(&request_msg(mac, xid, MessageType::Discover, None), server)
            .map_err(|e| format!("sending DISCOVER: {e}"))?;
        let Some(offer) = wait_reply(rx, xid, &[MessageType::Offer], step_end) else {
            wait = (wait * 2).min(Duration::from_secs(4));
            continue;
        };
        let request = request_msg(mac, xid, MessageType::Request, Some(&offer));
        for _ in 0..3 {
            sock.send_to(&request, server)
                .map_err(|e| format!("sending REQUEST: {e}"))?;
            let until = (Instant::now() + Duration::from_secs(1)).min(deadline);
            match wait_reply(rx, xid, &[MessageType::Ack, MessageType::Nak], until) {
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
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
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
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

fn apply(sock: &UdpSocket, ifname: &str, lease: &Lease) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr(lease.ip);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr(lease.netmask);
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    if let Some(mtu) = lease.mtu {
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        ioctl(
            sock,
            libc::SIOCSIFMTU,
            (&mut req as *mut libc::ifreq).cast(),
        )?;
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
        match ioctl(
            sock,
            libc::SIOCADDRT,
            (&mut rt as *mut libc::rtentry).cast(),
        ) {
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
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(
                192, 168, 127, 1,
            )));
        let r = request_msg(mac, 7, MessageType::Request, Some(&offer));
        let r = Message::decode(&mut Decoder::new(&r)).unwrap();
        assert_eq!(
            r.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                192, 168, 127, 2
            )))
        );
        assert_eq!(
            r.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(
                192, 168, 127, 1
            )))
        );
    }

    #[test]
    fn only_whole_udp_to_port_68_is_taken() {
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 192, 168, 127, 1, 255, 255, 255, 255,
        ];
        ip.extend_from_slice(&[0, 67, 0, 68, 0, 11, 0, 0, b'a', b'b', b'c']);
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(dhcp_client_payload(&ip), Some(&b"abc"[..]));
        for cut in 0..ip.len() {
            let _ = dhcp_client_payload(&ip[..cut]);
        }
        let mut wrong_port = ip.clone();
        wrong_port[23] = 69;
        assert_eq!(dhcp_client_payload(&wrong_port), None);
        let mut long = ip.clone();
        long[25] = 200;
        assert_eq!(
            dhcp_client_payload(&long),
            None,
            "UDP length past the packet"
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert!(parse_mac("52:54:00").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
    }
}
