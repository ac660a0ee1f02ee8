//! Shared helpers of the network tests: a fake guest that speaks raw Ethernet frames over the
//! backend's stream socket (as QEMU would), the shared case generators, and a stub DNS upstream.

#![allow(dead_code)]

pub mod vm;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxlite::net::framing::{encode_into, FrameDecoder};
use boxlite::net::usernet::packet;
use boxlite::net::Topology;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket,
};

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Runs shared case generator `NN-*.py` into a fresh temp dir (repo's ../shared first).
pub fn run_case(prefix: &str, args: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dirs = [
        repo.join("../shared/cases"),
        PathBuf::from("/work/shared/cases"),
    ];
    let script = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with(prefix) && name.ends_with(".py")
        })
        .unwrap_or_else(|| panic!("case generator {prefix}-*.py not found in {dirs:?}"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("case");
    let st = Command::new("python3")
        .arg(&script)
        .arg(&out)
        .args(args)
        .status()
        .expect("python3 runs");
    assert!(st.success(), "{} failed", script.display());
    (tmp, out)
}

/// A guest made of raw frames.
pub struct FakeGuest {
    stream: UnixStream,
    decoder: FrameDecoder,
    pub ip: Ipv4Addr,
    /// Frames received and not yet consumed.
    pub backlog: Vec<Vec<u8>>,
}

impl FakeGuest {
    pub fn connect(path: &Path) -> FakeGuest {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return FakeGuest {
                        stream,
                        decoder: FrameDecoder::new(),
                        ip: Topology::GUEST,
                        backlog: Vec::new(),
                    }
                }
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn send(&mut self, frame: &[u8]) {
        let mut buf = Vec::new();
        encode_into(&mut buf, frame);
        self.stream.write_all(&buf).unwrap();
    }

    /// The next frame within `timeout`; ARP requests for our address are answered on the way.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.decoder.next_frame().unwrap() {
                if self.answer_arp(&f) {
                    continue;
                }
                return Some(f);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the backend closed the stream"),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(_) => return None,
            }
        }
    }

    /// Every frame until nothing arrives for `quiet`.
    pub fn recv_all(&mut self, quiet: Duration) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Some(f) = self.recv(quiet) {
            v.push(f);
        }
        v
    }

    fn answer_arp(&mut self, frame: &[u8]) -> bool {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        if eth.ethertype() != EthernetProtocol::Arp {
            return false;
        }
        let arp = ArpPacket::new_checked(eth.payload()).unwrap();
        let Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&arp)
        else {
            return false;
        };
        if target_protocol_addr != self.ip {
            return false;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: self.ip,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: source_hardware_addr,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + reply.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        reply.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        self.send(&buf);
        true
    }

    pub fn send_udp(&mut self, src_port: u16, dst: SocketAddrV4, payload: &[u8]) {
        let f = packet::udp_frame(
            GUEST_MAC,
            Topology::GATEWAY_MAC,
            SocketAddrV4::new(self.ip, src_port),
            dst,
            payload,
        );
        self.send(&f);
    }

    /// The next UDP datagram to `port`: (source, payload).
    pub fn recv_udp(&mut self, port: u16, timeout: Duration) -> Option<(SocketAddrV4, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = self.recv(left)?;
            if let Some((src, dst, payload)) = parse_udp(&f) {
                if dst.port() == port {
                    return Some((src, payload));
                }
            }
            self.backlog.push(f);
        }
    }

    pub fn send_tcp(&mut self, src_port: u16, dst: SocketAddrV4, control: TcpControl, seq: u32) {
        let tcp = TcpRepr {
            src_port,
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: None,
            window_len: 64240,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: self.ip,
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: tcp.header_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress(Topology::GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; 14 + 20 + tcp.header_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &ChecksumCapabilities::default());
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &self.ip.into(),
            &(*dst.ip()).into(),
            &ChecksumCapabilities::default(),
        );
        self.send(&buf);
    }

    /// Waits for the TCP segment answering a SYN from `src_port`: (rst, syn+ack).
    pub fn recv_tcp_to(&mut self, src_port: u16, timeout: Duration) -> Option<(bool, bool)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let f = self.recv(left)?;
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            if eth.ethertype() == EthernetProtocol::Ipv4 {
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                if ip.next_header() == IpProtocol::Tcp {
                    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
                    if tcp.dst_port() == src_port {
                        return Some((tcp.rst(), tcp.syn() && tcp.ack()));
                    }
                }
            }
            self.backlog.push(f);
        }
    }
}

/// (src, dst, payload) of a UDP frame.
pub fn parse_udp(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    assert!(ip.verify_checksum(), "IPv4 checksum of a reply");
    assert!(
        udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()),
        "UDP checksum of a reply"
    );
    Some((
        SocketAddrV4::new(ip.src_addr(), udp.src_port()),
        SocketAddrV4::new(ip.dst_addr(), udp.dst_port()),
        udp.payload().to_vec(),
    ))
}

/// A stub upstream DNS server on 127.0.0.1 (UDP and TCP, same port) answering from the case 23
/// `zone.json`. It never truncates, so the forwarder under test must.
pub struct StubDns {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Zone = HashMap<String, serde_json::Value>;

impl StubDns {
    pub fn start(zone_json: &Path) -> StubDns {
        StubDns::start_at(zone_json, "127.0.0.1:0".parse().unwrap())
    }

    /// The stub on `at` (port 0: a free port, the same for UDP and TCP).
    pub fn start_at(zone_json: &Path, at: SocketAddr) -> StubDns {
        let zone: Zone = serde_json::from_slice(&std::fs::read(zone_json).unwrap()).unwrap();
        let zone = Arc::new(zone);
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(at).unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let zone = zone.clone();
            let stop = stop.clone();
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        if let Some(r) = stub_answer(&zone, &buf[..n]) {
                            let _ = udp.send_to(&r, peer);
                        }
                    }
                }
            });
        }
        {
            let stop = stop.clone();
            tcp.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let zone = zone.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        loop {
                            let mut len = [0u8; 2];
                            if s.read_exact(&mut len).is_err() {
                                return;
                            }
                            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                            if s.read_exact(&mut q).is_err() {
                                return;
                            }
                            let Some(r) = stub_answer(&zone, &q) else {
                                return;
                            };
                            let mut out = (r.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&r);
                            if s.write_all(&out).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        StubDns { addr, stop }
    }
}

fn stub_answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, TXT};
    use hickory_proto::rr::{RData, Record, RecordType};

    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    if let Some(e) = &q.edns {
        r.set_edns(e.clone());
    }
    let name = question.name().to_ascii().to_ascii_lowercase();
    match zone.get(&name) {
        Some(serde_json::Value::String(s)) if s == "NXDOMAIN" => {
            r.metadata.response_code = ResponseCode::NXDomain;
        }
        Some(serde_json::Value::Object(types)) => {
            let key = format!("{}", question.query_type());
            for v in types
                .get(&key)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                let rdata = match question.query_type() {
                    RecordType::A => RData::A(A(v.as_str()?.parse().ok()?)),
                    RecordType::AAAA => RData::AAAA(AAAA(v.as_str()?.parse().ok()?)),
                    RecordType::TXT => RData::TXT(TXT::new(
                        v.as_array()?
                            .iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect(),
                    )),
                    _ => continue,
                };
                r.add_answer(Record::from_rdata(question.name().clone(), 60, rdata));
            }
        }
        _ => r.metadata.response_code = ResponseCode::NXDomain,
    }
    r.to_vec().ok()
}
