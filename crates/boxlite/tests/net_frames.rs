//! Frame-level tests of usernet: raw Ethernet frames injected over the backend's stream socket,
//! exactly as QEMU would deliver them, and the frames that come back checked field by field.
//! Cases 23 (DNS truncation), 27 (host loopback exposure) and 28 (DHCP NAK) from the shared
//! case generators.

mod net_common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use boxlite::net::{NetworkHandle, NetworkKind, NetworkOptions, PortForward, Topology};
use dhcproto::v4::{Message as Dhcp, MessageType};
use dhcproto::{Decodable, Decoder};
use hickory_proto::op::Message as Dns;
use net_common::{parse_udp, run_case, FakeGuest, StubDns};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv4Packet, TcpControl};

fn start(opts: impl FnOnce(&mut NetworkOptions)) -> (tempfile::TempDir, NetworkHandle, FakeGuest) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = NetworkOptions::new(NetworkKind::Usernet, dir.path());
    opts(&mut o);
    let (handle, config) = NetworkHandle::start(o).unwrap();
    let guest = FakeGuest::connect(config.socket_path.as_ref().unwrap());
    (dir, handle, guest)
}

const SHORT: Duration = Duration::from_millis(400);

/// The descriptor-counting test takes this exclusively; every other test shares it.
static FDS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FDS.read().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn case_28_dhcp_nak_is_broadcast_and_bad_packets_are_ignored() {
    let _fds = shared();
    let (_case_dir, case) = run_case("28", &[]);
    let frame = |name: &str| std::fs::read(case.join(name)).unwrap();
    let (_d, net, mut guest) = start(|_| {});

    // 1: INIT-REBOOT for an address outside the pool: exactly one broadcast NAK.
    guest.send(&frame("01-request-foreign-address.bin"));
    let replies = guest.recv_all(SHORT);
    assert_eq!(replies.len(), 1, "exactly one reply to the foreign REQUEST");
    assert!(
        replies
            .iter()
            .all(|f| EthernetFrame::new_checked(&f[..]).unwrap().ethertype()
                != EthernetProtocol::Arp),
        "no ARP (the bug resolved 0.0.0.0)"
    );
    let eth = EthernetFrame::new_checked(&replies[0][..]).unwrap();
    assert_eq!(eth.dst_addr().0, [0xff; 6], "Ethernet broadcast");
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(ip.dst_addr(), Ipv4Addr::BROADCAST, "IP broadcast");
    let (src, dst, payload) = parse_udp(&replies[0]).unwrap();
    assert_eq!((src.port(), dst.port()), (67, 68));
    let nak = Dhcp::decode(&mut Decoder::new(&payload)).unwrap();
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.xid(), 0x1badc0de);
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);

    // 2: the client chose another server: silence. 3, 4: broken packets: silence.
    for name in [
        "02-request-other-server.bin",
        "03-truncated.bin",
        "04-bad-option-length.bin",
    ] {
        guest.send(&frame(name));
        assert!(guest.recv_all(SHORT).is_empty(), "{name} must get no reply");
    }

    // 5: the stack still runs and offers an address from its pool.
    guest.send(&frame("05-discover.bin"));
    let (_, offer) = guest
        .recv_udp(68, Duration::from_secs(2))
        .expect("an OFFER");
    let offer = Dhcp::decode(&mut Decoder::new(&offer)).unwrap();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.xid(), 0x1badc0e2);
    let yi = offer.yiaddr().octets();
    assert_eq!(&yi[..3], &[192, 168, 127], "offer inside the Box subnet");
    assert!(
        (2..34).contains(&yi[3]),
        "offer inside the pool: {}",
        offer.yiaddr()
    );
    assert_eq!(net.metrics().dhcp_leases, Some(0), "no lease was granted");
    assert!(net.metrics().tx_packets >= 5);
}

#[test]
fn case_23_dns_replies_fit_the_client_and_set_tc() {
    let _fds = shared();
    let (_case_dir, case) = run_case("23", &[]);
    let stub = StubDns::start(&case.join("zone.json"));
    let (_d, net, mut guest) = start(|o| o.dns = vec![stub.addr]);
    let dns = SocketAddrV4::new(Topology::GATEWAY, 53);

    let ask = |guest: &mut FakeGuest, name: &str, port: u16| -> (Dns, usize) {
        let q = std::fs::read(case.join("queries").join(format!("{name}.bin"))).unwrap();
        guest.send_udp(port, dns, &q);
        let (src, reply) = guest
            .recv_udp(port, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no reply to {name}"));
        assert_eq!(src, dns, "reply comes from the DNS address");
        let m = Dns::from_vec(&reply).unwrap_or_else(|e| panic!("{name}: malformed reply: {e}"));
        assert_eq!(&reply[..2], &q[..2], "{name}: the query's ID");
        (m, reply.len())
    };

    let (m, len) = ask(&mut guest, "many-A-noedns", 40001);
    assert!(len <= 512, "no EDNS: {len} > 512");
    assert!(
        m.metadata.truncation,
        "60 A records do not fit in 512 bytes: TC"
    );
    let (m, len) = ask(&mut guest, "many-A-edns512", 40002);
    assert!(len <= 512 && m.metadata.truncation);
    let (m, len) = ask(&mut guest, "many-A-edns1232", 40003);
    assert!(len <= 1232);
    // 60 A records compressed take 12 + 22 + 60 * 16 + 11 = 1005 bytes: they fit.
    assert!(
        !m.metadata.truncation && m.answers.len() == 60,
        "all 60 fit in 1232"
    );
    let (m, len) = ask(&mut guest, "bigtxt-noedns", 40004);
    assert!(
        len <= 512 && m.metadata.truncation,
        "big TXT: TC, {len} bytes"
    );
    let (m, _) = ask(&mut guest, "small-A", 40005);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        format!("{}", m.answers[0].data),
        "198.51.100.200",
        "the one A record"
    );
    let (m, _) = ask(&mut guest, "nx", 40006);
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert_eq!(net.metrics().dns_queries, Some(6));

    // Upstream gone: SERVFAIL, never an empty NOERROR.
    drop(stub);
    let (_d2, _net2, mut guest2) = start(|o| o.dns = vec!["127.0.0.1:9".parse().unwrap()]);
    let (m, _) = ask(&mut guest2, "small-A", 40007);
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::ServFail
    );
}

struct Listeners {
    tcp: TcpListener,
    udp: UdpSocket,
    tcp6: Option<TcpListener>,
}

impl Listeners {
    fn bind() -> Listeners {
        let tcp = TcpListener::bind("127.0.0.1:18555").expect("127.0.0.1:18555/tcp free");
        tcp.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:18555").expect("127.0.0.1:18555/udp free");
        udp.set_nonblocking(true).unwrap();
        let tcp6 = TcpListener::bind("[::1]:18556").ok();
        if let Some(l) = &tcp6 {
            l.set_nonblocking(true).unwrap();
        }
        Listeners { tcp, udp, tcp6 }
    }

    /// (tcp connections, udp datagrams) seen since the last call.
    fn seen(&self) -> (usize, usize) {
        let mut tcp = 0;
        while self.tcp.accept().is_ok() {
            tcp += 1;
        }
        if let Some(l) = &self.tcp6 {
            while l.accept().is_ok() {
                tcp += 1;
            }
        }
        let mut udp = 0;
        let mut buf = [0u8; 100];
        while self.udp.recv_from(&mut buf).is_ok() {
            udp += 1;
        }
        (tcp, udp)
    }
}

#[test]
fn case_27_host_loopback_is_private_unless_allowed() {
    let _fds = shared();
    let listeners = Listeners::bind();
    let gw = |port| SocketAddrV4::new(Topology::GATEWAY, port);
    let alias = |port| SocketAddrV4::new(Topology::HOST_ALIAS, port);

    // Default configuration: gateway, host alias and a forged 127.0.0.1 are all refused fast.
    let (_d, net, mut guest) = start(|_| {});
    guest.send_udp(5000, gw(18555), b"ping");
    guest.send_udp(5001, alias(18555), b"ping");
    for (i, dst) in [
        gw(18555),
        alias(18555),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18555),
    ]
    .into_iter()
    .enumerate()
    {
        let port = 41000 + i as u16;
        let t = Instant::now();
        guest.send_tcp(port, dst, TcpControl::Syn, 1000);
        let (rst, _) = guest
            .recv_tcp_to(port, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("no answer to a SYN to {dst}"));
        assert!(rst, "SYN to {dst} is reset");
        assert!(t.elapsed() < Duration::from_secs(1), "refused promptly");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        listeners.seen(),
        (0, 0),
        "host loopback listeners saw nothing"
    );
    assert_eq!(net.metrics().refused_connects, Some(5));
    drop((guest, net));

    // Explicit opt-in: the host alias reaches the listeners; the gateway still never does.
    let (_d, _net, mut guest) = start(|o| o.allow_host = true);
    guest.send_tcp(42000, alias(18555), TcpControl::Syn, 1000);
    let (rst, synack) = guest.recv_tcp_to(42000, Duration::from_secs(3)).unwrap();
    assert!(!rst && synack, "the host alias accepts with allow_host");
    guest.send_udp(5002, alias(18555), b"ping");
    guest.send_tcp(42001, gw(18555), TcpControl::Syn, 1000);
    let (rst, _) = guest.recv_tcp_to(42001, Duration::from_secs(2)).unwrap();
    assert!(rst, "the gateway stays closed even with allow_host");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        listeners.seen(),
        (1, 1),
        "one TCP and one UDP flow via the alias"
    );
}

#[test]
fn full_dhcp_exchange_and_udp_nat_round_trip() {
    let _fds = shared();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], peer);
        }
    });
    let (_d, net, mut guest) = start(|o| {
        o.allow_host = true;
        o.hostname = Some("box1".into());
    });
    // The UDP flow leaves through the host alias to the echo server on host loopback.
    let dst = SocketAddrV4::new(Topology::HOST_ALIAS, echo_addr.port());
    for i in 0..5u8 {
        guest.send_udp(6000, dst, &[i; 100]);
        let (src, data) = guest.recv_udp(6000, Duration::from_secs(2)).unwrap();
        assert_eq!(src, dst, "replies appear to come from where the guest sent");
        assert_eq!(data, vec![i; 100]);
    }
    assert_eq!(
        net.metrics().udp_flows,
        Some(1),
        "one flow for one source/destination pair"
    );
    let m = net.metrics();
    assert_eq!((m.tx_packets, m.rx_packets), (5, 5));
    assert_eq!(m.tx_bytes, 5 * (14 + 20 + 8 + 100));
}

#[test]
fn udp_port_forward_round_trip_and_removal() {
    let _fds = shared();
    let (_d, net, mut guest) = start(|o| o.port_forwards = vec![PortForward::udp(0, 5353)]);
    let f = net.port_forwards()[0];
    assert_ne!(f.host_port, 0, "the picked port is reported");
    // Any frame teaches the stack the guest's MAC (a real guest starts with DHCP).
    guest.send_udp(9, SocketAddrV4::new(Topology::GATEWAY, 9), b"hi");
    std::thread::sleep(Duration::from_millis(200));

    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for round in 0..3u8 {
        host.send_to(&[b'q', round], f.host_addr()).unwrap();
        let (src, data) = guest
            .recv_udp(5353, Duration::from_secs(2))
            .expect("forwarded");
        assert_eq!(data, vec![b'q', round]);
        assert_eq!(
            *src.ip(),
            Topology::GATEWAY,
            "forwarded datagrams come from the gateway"
        );
        guest.send_udp(5353, src, &[b'r', round]);
        let mut buf = [0u8; 16];
        let (n, from) = host.recv_from(&mut buf).expect("the guest's answer");
        assert_eq!(&buf[..n], &[b'r', round]);
        assert_eq!(from, f.host_addr(), "answers come from the forwarded port");
    }
    net.remove_port_forward(&f).unwrap();
    assert!(net.port_forwards().is_empty());
    let _ = host.send_to(b"late", f.host_addr());
    assert!(
        guest.recv_udp(5353, SHORT).is_none(),
        "a removed forward forwards nothing"
    );
    assert!(
        net.remove_port_forward(&f).is_err(),
        "removing twice is an error"
    );
}

#[test]
fn icmp_echo_goes_out_through_ping_sockets() {
    let _fds = shared();
    // Ping sockets need net.ipv4.ping_group_range, a per-namespace setting: run the stack in a
    // private network namespace of this thread (and of the threads and commands it starts).
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "ip link set lo up && ip addr add 10.99.0.1/32 dev lo && \
                 echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range",
            )
            .status()
            .unwrap();
        assert!(st.success());
        let (_d, _net, mut guest) = start(|_| {});
        let dst = Ipv4Addr::new(10, 99, 0, 1);
        for seq in 1..=3u16 {
            let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
            icmp.extend_from_slice(&seq.to_be_bytes());
            icmp.extend_from_slice(b"boxlite ping payload");
            let frame = boxlite::net::usernet::packet::icmp_frame(
                net_common::GUEST_MAC,
                Topology::GATEWAY_MAC,
                Topology::GUEST,
                dst,
                &icmp,
            );
            guest.send(&frame);
            let reply = loop {
                let f = guest.recv(Duration::from_secs(2)).expect("an echo reply");
                let eth = EthernetFrame::new_checked(&f[..]).unwrap();
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                if ip.next_header() == smoltcp::wire::IpProtocol::Icmp {
                    assert_eq!(ip.src_addr(), dst);
                    break ip.payload().to_vec();
                }
            };
            let p = smoltcp::wire::Icmpv4Packet::new_checked(&reply[..]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(p.msg_type(), smoltcp::wire::Icmpv4Message::EchoReply);
            assert_eq!((p.echo_ident(), p.echo_seq_no()), (0x1234, seq));
            assert_eq!(p.data(), b"boxlite ping payload");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn pending_connects_are_bounded_and_freed() {
    let _fds = FDS.write().unwrap_or_else(|e| e.into_inner());
    // SYNs to a destination that never answers (routed into lo of a private namespace, where
    // nothing forwards them) keep host connects pending: past the limit, SYNs are reset at once,
    // and stopping the backend closes every descriptor it held.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg("ip link set lo up && ip route add 10.98.0.0/24 dev lo")
            .status()
            .unwrap();
        assert!(st.success());
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let fds0 = fds();
        let (_d, net, mut guest) = start(|_| {});
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 98, 0, 2), 80);
        let limit = 1024;
        let extra = 50;
        for i in 0..(limit + extra) as u16 {
            guest.send_tcp(20000 + i, dst, TcpControl::Syn, 7);
        }
        let mut resets = 0;
        while let Some(f) = guest.recv(Duration::from_millis(1500)) {
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            if let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) {
                if let Ok(tcp) = smoltcp::wire::TcpPacket::new_checked(ip.payload()) {
                    if tcp.rst() {
                        resets += 1;
                    }
                }
            }
        }
        let m = net.metrics();
        assert_eq!(m.tcp_connections, Some(limit as u64), "{m:?}");
        assert_eq!(resets, extra, "SYNs past the limit are reset at once");
        assert!(
            fds() <= fds0 + limit + 16,
            "one descriptor per pending connect"
        );
        drop((guest, net));
        assert!(
            fds() <= fds0 + 1,
            "stopping frees everything ({} vs {fds0})",
            fds()
        );
    })
    .join()
    .unwrap();
}

#[test]
fn arp_is_answered_only_for_our_addresses() {
    let _fds = shared();
    let (_d, _net, mut guest) = start(|_| {});
    let ask = |guest: &mut FakeGuest, target: Ipv4Addr| -> Option<[u8; 6]> {
        let req = smoltcp::wire::ArpRepr::EthernetIpv4 {
            operation: smoltcp::wire::ArpOperation::Request,
            source_hardware_addr: smoltcp::wire::EthernetAddress(net_common::GUEST_MAC),
            source_protocol_addr: Topology::GUEST,
            target_hardware_addr: smoltcp::wire::EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let eth = smoltcp::wire::EthernetRepr {
            src_addr: smoltcp::wire::EthernetAddress(net_common::GUEST_MAC),
            dst_addr: smoltcp::wire::EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + req.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        req.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(
            f.payload_mut(),
        ));
        guest.send(&buf);
        let reply = guest.recv(SHORT)?;
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        let arp = smoltcp::wire::ArpPacket::new_checked(eth.payload()).unwrap();
        match smoltcp::wire::ArpRepr::parse(&arp).unwrap() {
            smoltcp::wire::ArpRepr::EthernetIpv4 {
                operation: smoltcp::wire::ArpOperation::Reply,
                source_hardware_addr,
                source_protocol_addr,
                ..
            } => {
                assert_eq!(source_protocol_addr, target);
                Some(source_hardware_addr.0)
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        ask(&mut guest, Topology::GATEWAY),
        Some(Topology::GATEWAY_MAC)
    );
    assert_eq!(
        ask(&mut guest, Topology::HOST_ALIAS),
        Some(Topology::GATEWAY_MAC)
    );
    for other in [
        Ipv4Addr::new(192, 168, 127, 50),
        Topology::GUEST,
        Ipv4Addr::new(10, 0, 0, 1),
    ] {
        assert_eq!(ask(&mut guest, other), None, "{other} is not ours to claim");
    }
}

#[test]
fn big_udp_answers_reach_the_guest_as_fragments() {
    let _fds = shared();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        if let Ok((_, peer)) = echo.recv_from(&mut buf) {
            let big: Vec<u8> = (0..9000).map(|i| (i % 249) as u8).collect();
            let _ = echo.send_to(&big, peer);
        }
    });
    let (_d, _net, mut guest) = start(|o| o.allow_host = true);
    guest.send_udp(
        7000,
        SocketAddrV4::new(Topology::HOST_ALIAS, port),
        b"big please",
    );
    let mut datagram = vec![0u8; 8 + 9000];
    let mut got = 0;
    let mut last_seen = false;
    while !(last_seen && got == datagram.len()) {
        let f = guest.recv(Duration::from_secs(2)).expect("all fragments");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum() && f.len() <= 1514);
        let off = usize::from(ip.frag_offset());
        datagram[off..off + ip.payload().len()].copy_from_slice(ip.payload());
        got += ip.payload().len();
        last_seen |= !ip.more_frags();
    }
    let udp = smoltcp::wire::UdpPacket::new_checked(&datagram[..]).unwrap();
    assert!(udp.verify_checksum(&Topology::HOST_ALIAS.into(), &Topology::GUEST.into()));
    assert_eq!(udp.dst_port(), 7000);
    let want: Vec<u8> = (0..9000).map(|i| (i % 249) as u8).collect();
    assert_eq!(udp.payload(), &want[..]);
}
