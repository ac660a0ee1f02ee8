//! The usernet event loop: QEMU's stream socket on one side, host sockets on the other, smoltcp
//! in between for the guest's TCP.
//!
//! Every frame from the guest is looked at before smoltcp sees it:
//! - ARP requests reach smoltcp only for our two addresses (the gateway and the host alias), so
//!   the stack never claims addresses it does not own (smoltcp's any-IP mode would).
//! - UDP never reaches smoltcp: DHCP (port 67), DNS (gateway:53) and NAT'ed flows are handled
//!   here and answers are built by [`packet`].
//! - A TCP SYN opening a new connection is held while a non-blocking connect to the host
//!   destination runs; when it succeeds a listening smoltcp socket is created for exactly that
//!   destination and the SYN replayed into it; when it fails (or policy refuses) the guest gets a
//!   RST at once. Everything else of TCP is smoltcp's job.
//! - ICMP echo to the gateway or the host alias is answered by smoltcp; other ICMP is dropped.
//!
//! Resources are bounded: at most [`MAX_TCP`] TCP connections, [`udp::MAX_FLOWS`] UDP flows,
//! [`MAX_DNS_IN_FLIGHT`] DNS lookups and a bounded output buffer toward QEMU (see [`device`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress,
    IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};
use tracing::{debug, info, warn};

use super::device::QueueDevice;
use super::dhcp::{Destination, DhcpConfig, DhcpServer};
use super::dns::{self, Transport};
use super::packet::{self, SegmentId};
use super::policy::{self, Target};
use super::tcp::{Peer, Pumped, TcpConn};
use super::udp::{self, UdpFlow, UdpForward};
use super::{Command, Counters, StackConfig};
use crate::net::framing::FrameDecoder;
use crate::net::{NetworkError, PortForward, Protocol, Result, Topology};

/// Most TCP connections (NAT, forwards, DNS) at once; further SYNs are reset.
pub const MAX_TCP: usize = 1024;
/// Most DNS lookups waiting on upstreams at once; further UDP queries are dropped.
pub const MAX_DNS_IN_FLIGHT: usize = 64;
/// How long a guest SYN may wait for the host connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames queued for smoltcp before we stop reading QEMU's socket for a while.
const MAX_RX_QUEUE: usize = 512;
const TCP_BUFFER: usize = 64 * 1024;

const WAKER: Token = Token(0);
const LISTENER: Token = Token(1);
const QEMU: Token = Token(2);
const FIRST_DYNAMIC: usize = 16;

/// Where a finished DNS lookup goes back to.
#[derive(Debug)]
enum DnsReturn {
    Udp { guest: SocketAddrV4 },
    Tcp { token: Token },
}

#[derive(Debug)]
struct DnsDone {
    to: DnsReturn,
    reply: Option<Vec<u8>>,
}

pub(crate) struct Stack {
    poll: Poll,
    waker: Arc<Waker>,
    listener: UnixListener,
    qemu: Option<UnixStream>,
    qemu_readable: bool,
    decoder: FrameDecoder,
    out_pos: usize,

    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    guest_mac: Option<[u8; 6]>,
    start: Instant,

    config: StackConfig,
    counters: Arc<Counters>,
    forward_list: Arc<Mutex<Vec<PortForward>>>,
    dhcp: DhcpServer,

    next_token: usize,
    next_gw_port: u16,
    tcp: HashMap<Token, TcpConn>,
    tcp_by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), Token>,
    flows: HashMap<Token, UdpFlow>,
    flow_by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), Token>,
    tcp_forwards: HashMap<Token, (PortForward, TcpListener)>,
    udp_forwards: HashMap<Token, UdpForward>,
    /// Gateway port → (UDP forward, host peer) for guest replies to forwarded datagrams.
    udp_forward_ports: HashMap<u16, (Token, SocketAddr)>,

    dns_tx: Sender<DnsDone>,
    dns_rx: Receiver<DnsDone>,
    dns_in_flight: usize,
    last_housekeeping: Instant,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("tcp", &self.tcp.len())
            .field("udp_flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> NetworkError + '_ {
    move |source| NetworkError::Io {
        what: what.to_string(),
        source,
    }
}

impl Stack {
    pub fn new(
        listener: StdUnixListener,
        config: StackConfig,
        counters: Arc<Counters>,
        forward_list: Arc<Mutex<Vec<PortForward>>>,
    ) -> Result<Stack> {
        let poll = Poll::new().map_err(io_err("creating the event poller"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(io_err("creating the event waker"))?,
        );
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the network socket"))?;
        let mut listener = UnixListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_err("watching the network socket"))?;

        let mut device = QueueDevice::new(counters.clone());
        let mac = HardwareAddress::Ethernet(EthernetAddress(Topology::GATEWAY_MAC));
        let mut iface = Interface::new(
            Config::new(mac),
            &mut device,
            smoltcp::time::Instant::from_millis(0),
        );
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(Topology::GATEWAY.into(), Topology::PREFIX_LEN));
            let _ = addrs.push(IpCidr::new(
                Topology::HOST_ALIAS.into(),
                Topology::PREFIX_LEN,
            ));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Topology::GATEWAY)
            .expect("the route table has room for one route");

        let (dns_tx, dns_rx) = mpsc::channel();
        let dhcp = DhcpServer::new(DhcpConfig::boxlite(config.hostname.clone()));
        Ok(Stack {
            poll,
            waker,
            listener,
            qemu: None,
            qemu_readable: false,
            decoder: FrameDecoder::new(),
            out_pos: 0,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            guest_mac: None,
            start: Instant::now(),
            config,
            counters,
            forward_list,
            dhcp,
            next_token: FIRST_DYNAMIC,
            next_gw_port: 20000,
            tcp: HashMap::new(),
            tcp_by_tuple: HashMap::new(),
            flows: HashMap::new(),
            flow_by_tuple: HashMap::new(),
            tcp_forwards: HashMap::new(),
            udp_forwards: HashMap::new(),
            udp_forward_ports: HashMap::new(),
            dns_tx,
            dns_rx,
            dns_in_flight: 0,
            last_housekeeping: Instant::now(),
        })
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Runs until told to stop.
    pub fn run(mut self, commands: Receiver<Command>) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "usernet event loop failed");
                return;
            }
            for ev in events.iter() {
                self.on_event(
                    ev.token(),
                    ev.is_readable() || ev.is_read_closed(),
                    ev.is_writable() || ev.is_error(),
                );
            }
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Stop => return,
                    Command::AddForward(f, reply) => {
                        let _ = reply.send(self.add_forward(f));
                    }
                    Command::RemoveForward(f, reply) => {
                        let _ = reply.send(self.remove_forward(&f));
                    }
                }
            }
            while let Ok(done) = self.dns_rx.try_recv() {
                self.on_dns_done(done);
            }
            self.process();
            if self.last_housekeeping.elapsed() >= Duration::from_millis(500) {
                self.housekeeping();
            }
        }
    }

    fn timeout(&mut self) -> Duration {
        if !self.device.rx.is_empty() || (self.qemu_readable && self.device.rx.len() < MAX_RX_QUEUE)
        {
            return Duration::ZERO;
        }
        let now = self.smol_now();
        let smol = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1));
        smol.min(Duration::from_millis(500))
    }

    fn on_event(&mut self, token: Token, readable: bool, writable: bool) {
        match token {
            WAKER => {}
            LISTENER => self.accept_qemu(),
            QEMU => {
                if readable {
                    self.qemu_readable = true;
                }
            }
            t => {
                if let Some(conn) = self.tcp.get_mut(&t) {
                    conn.host_readable |= readable;
                    conn.host_writable |= writable;
                    if writable {
                        self.finish_connect(t);
                    }
                } else if self.flows.contains_key(&t) {
                    self.read_flow(t);
                } else if self.tcp_forwards.contains_key(&t) {
                    self.accept_forward(t);
                } else if self.udp_forwards.contains_key(&t) {
                    self.read_udp_forward(t);
                }
            }
        }
    }

    // ---- QEMU side ----

    fn accept_qemu(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.qemu.is_some() {
                        warn!("a second VMM connected to the network socket; refusing it");
                        continue;
                    }
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        QEMU,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!(error = %e, "cannot watch the VMM connection");
                        continue;
                    }
                    info!("VMM connected to usernet");
                    self.qemu = Some(stream);
                    self.qemu_readable = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "accepting the VMM connection failed");
                    return;
                }
            }
        }
    }

    fn disconnect_qemu(&mut self) {
        info!("VMM disconnected from usernet");
        if let Some(mut s) = self.qemu.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        self.qemu_readable = false;
        self.decoder = FrameDecoder::new();
        self.device.rx.clear();
        self.device.out.clear();
        self.out_pos = 0;
        let tokens: Vec<Token> = self.tcp.keys().copied().collect();
        for t in tokens {
            self.remove_tcp(t);
        }
    }

    fn read_qemu(&mut self) {
        let mut buf = [0u8; 65536];
        while self.qemu_readable && self.device.rx.len() < MAX_RX_QUEUE {
            let Some(stream) = self.qemu.as_mut() else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => return self.disconnect_qemu(),
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    loop {
                        match self.decoder.next_frame() {
                            Ok(Some(frame)) => self.on_guest_frame(frame),
                            Ok(None) => break,
                            Err(e) => {
                                warn!(error = %e, "dropping the VMM connection");
                                return self.disconnect_qemu();
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.qemu_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.disconnect_qemu(),
            }
        }
    }

    fn flush_qemu(&mut self) {
        let Some(stream) = self.qemu.as_mut() else {
            self.device.out.clear();
            return;
        };
        while self.out_pos < self.device.out.len() {
            match stream.write(&self.device.out[self.out_pos..]) {
                Ok(0) => break,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if self.out_pos == self.device.out.len() {
            self.device.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > 1 << 20 {
            self.device.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// One round: frames in, smoltcp, connections, smoltcp again, frames out.
    fn process(&mut self) {
        self.read_qemu();
        let now = self.smol_now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.pump_connections();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.flush_qemu();
    }

    // ---- frames from the guest ----

    fn on_guest_frame(&mut self, frame: Vec<u8>) {
        self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .tx_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        if !self.classify(&frame) {
            self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles or queues a frame; false when it was dropped.
    fn classify(&mut self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        let src_mac = eth.src_addr();
        if src_mac.is_unicast() {
            self.guest_mac = Some(src_mac.0);
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                    return false;
                };
                if arp.operation() == ArpOperation::Request {
                    let target = arp.target_protocol_addr();
                    if target.len() != 4
                        || ![Topology::GATEWAY.octets(), Topology::HOST_ALIAS.octets()]
                            .iter()
                            .any(|ours| ours[..] == *target)
                    {
                        return true; // someone else's address: not ours to answer
                    }
                }
                self.device.rx.push_back(frame.to_vec());
                true
            }
            EthernetProtocol::Ipv4 => self.classify_ipv4(frame, eth.payload()),
            _ => false,
        }
    }

    fn classify_ipv4(&mut self, frame: &[u8], payload: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(payload) else {
            return false;
        };
        if !ip.verify_checksum() || ip.more_frags() || ip.frag_offset() != 0 {
            return false;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        match ip.next_header() {
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                    return false;
                };
                let src = SocketAddrV4::new(src, udp.src_port());
                let dst = SocketAddrV4::new(dst, udp.dst_port());
                self.on_guest_udp(src, dst, udp.payload());
                true
            }
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return false;
                };
                if !policy::valid_guest_source(src) {
                    return false;
                }
                let seg = SegmentId {
                    src: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                    seq: tcp.seq_number().0 as u32,
                    ack: tcp.ack().then(|| tcp.ack_number().0 as u32),
                    syn: tcp.syn(),
                    fin: tcp.fin(),
                    payload_len: tcp.payload().len(),
                };
                if tcp.rst() {
                    if self.tcp_by_tuple.contains_key(&(seg.src, seg.dst)) {
                        self.device.rx.push_back(frame.to_vec());
                    }
                    return true;
                }
                if let Some(t) = self.tcp_by_tuple.get(&(seg.src, seg.dst)) {
                    if self.tcp.get(t).is_some_and(|c| c.handle.is_some()) {
                        self.device.rx.push_back(frame.to_vec());
                    }
                    return true; // a SYN retransmitted while the host connect runs
                }
                if tcp.syn() && !tcp.ack() {
                    self.on_guest_syn(frame, seg);
                } else {
                    self.reset(&seg);
                }
                true
            }
            IpProtocol::Icmp => {
                if dst == Topology::GATEWAY || dst == Topology::HOST_ALIAS {
                    self.device.rx.push_back(frame.to_vec());
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    fn reset(&mut self, seg: &SegmentId) {
        if let Some(mac) = self.guest_mac {
            let rst = packet::tcp_reset(Topology::GATEWAY_MAC, mac, seg);
            self.device.send_frame(&rst);
        }
    }

    fn refuse(&mut self, seg: &SegmentId) {
        debug!(src = %seg.src, dst = %seg.dst, "refusing guest connect");
        self.counters
            .refused_connects
            .fetch_add(1, Ordering::Relaxed);
        self.reset(seg);
    }

    // ---- TCP ----

    fn on_guest_syn(&mut self, frame: &[u8], seg: SegmentId) {
        if self.tcp.len() >= MAX_TCP {
            warn!(dst = %seg.dst, "too many TCP connections; refusing");
            return self.refuse(&seg);
        }
        let tuple = (seg.src, seg.dst);
        match policy::target(seg.dst, self.config.allow_host) {
            Target::Refuse => self.refuse(&seg),
            Target::Dns => {
                let token = self.token();
                self.add_tcp(token, TcpConn::dns(tuple));
                self.attach_syn(token, frame.to_vec());
            }
            Target::Host(addr) => {
                let mut stream = match TcpStream::connect(SocketAddr::V4(addr)) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(dst = %addr, error = %e, "host connect failed");
                        return self.refuse(&seg);
                    }
                };
                let token = self.token();
                if self
                    .poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    .is_err()
                {
                    return self.refuse(&seg);
                }
                self.add_tcp(token, TcpConn::host(tuple, stream, Some(frame.to_vec())));
            }
        }
    }

    fn add_tcp(&mut self, token: Token, conn: TcpConn) {
        self.tcp_by_tuple.insert(conn.tuple, token);
        self.tcp.insert(token, conn);
        self.counters
            .tcp_connections
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .tcp_connections_total
            .fetch_add(1, Ordering::Relaxed);
    }

    fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        s.set_nagle_enabled(false);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    fn listen(&mut self, at: SocketAddrV4) -> smoltcp::iface::SocketHandle {
        let mut s = Self::new_socket();
        s.listen(IpListenEndpoint {
            addr: Some((*at.ip()).into()),
            port: at.port(),
        })
        .expect("listening on a non-zero port succeeds");
        self.sockets.add(s)
    }

    /// A host connect finished (or failed): replay the SYN into a fresh socket, or reset.
    fn finish_connect(&mut self, token: Token) {
        let Some(conn) = self.tcp.get_mut(&token) else {
            return;
        };
        let Peer::Host {
            stream,
            connected,
            syn,
            ..
        } = &mut conn.peer
        else {
            return;
        };
        if *connected {
            return;
        }
        let failed = match stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match stream.peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => true,
            },
        };
        let syn = syn.take().unwrap_or_default();
        if failed {
            let seg = syn_segment(&syn);
            self.remove_tcp(token);
            if let Some(seg) = seg {
                self.refuse(&seg);
            }
            return;
        }
        *connected = true;
        conn.host_readable = true;
        conn.host_writable = true;
        self.attach_syn(token, syn);
    }

    /// Gives connection `token` a socket listening on exactly its destination and feeds it the
    /// guest's SYN at once, so no other listener for the same destination can take that SYN.
    fn attach_syn(&mut self, token: Token, syn: Vec<u8>) {
        let Some(dst) = self.tcp.get(&token).map(|c| c.tuple.1) else {
            return;
        };
        let handle = self.listen(dst);
        if let Some(conn) = self.tcp.get_mut(&token) {
            conn.handle = Some(handle);
        }
        self.device.rx.push_front(syn.clone());
        let now = self.smol_now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            debug!(dst = %dst, "the guest SYN was not taken; refusing");
            self.remove_tcp(token);
            if let Some(seg) = syn_segment(&syn) {
                self.refuse(&seg);
            }
        }
    }

    fn remove_tcp(&mut self, token: Token) {
        if let Some(mut conn) = self.tcp.remove(&token) {
            self.tcp_by_tuple.remove(&conn.tuple);
            if let Some(h) = conn.handle {
                self.sockets.remove(h);
            }
            if let Peer::Host { stream, .. } = &mut conn.peer {
                let _ = self.poll.registry().deregister(stream);
            }
            self.counters
                .tcp_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn pump_connections(&mut self) {
        let mut done = Vec::new();
        let mut dns_queries = Vec::new();
        for (token, conn) in self.tcp.iter_mut() {
            let Some(handle) = conn.handle else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            let mut queries = Vec::new();
            if conn.pump(sock, &mut queries) == Pumped::Done {
                done.push(*token);
            }
            for q in queries {
                dns_queries.push((*token, q));
            }
        }
        for t in done {
            self.remove_tcp(t);
        }
        for (token, q) in dns_queries {
            self.spawn_dns(q, DnsReturn::Tcp { token }, Transport::Tcp);
        }
    }

    // ---- UDP ----

    fn on_guest_udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        if dst.port() == 67 && src.port() == 68 {
            return self.on_dhcp(payload);
        }
        if !policy::valid_guest_source(*src.ip()) {
            return;
        }
        if *dst.ip() == Topology::GATEWAY {
            if let Some((token, peer)) = self.udp_forward_ports.get(&dst.port()).copied() {
                if let Some(fwd) = self.udp_forwards.get_mut(&token) {
                    let _ = fwd.socket.send_to(payload, peer);
                    if let Some(p) = fwd.peers.get_mut(&peer) {
                        p.1 = Instant::now();
                    }
                }
                return;
            }
        }
        match policy::target(dst, self.config.allow_host) {
            Target::Dns => self.spawn_dns(
                payload.to_vec(),
                DnsReturn::Udp { guest: src },
                Transport::Udp,
            ),
            Target::Refuse => {
                self.counters
                    .refused_connects
                    .fetch_add(1, Ordering::Relaxed);
            }
            Target::Host(addr) => self.nat_udp(src, dst, addr, payload),
        }
    }

    fn nat_udp(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        host: SocketAddrV4,
        payload: &[u8],
    ) {
        let token = match self.flow_by_tuple.get(&(src, dst)) {
            Some(t) => *t,
            None => {
                if self.flows.len() >= udp::MAX_FLOWS {
                    self.evict_oldest_flow();
                }
                let Ok(mut socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0).into()) else {
                    return;
                };
                if socket.connect(SocketAddr::V4(host)).is_err() {
                    return;
                }
                let token = self.token();
                if self
                    .poll
                    .registry()
                    .register(&mut socket, token, Interest::READABLE)
                    .is_err()
                {
                    return;
                }
                self.flows.insert(
                    token,
                    UdpFlow {
                        guest: src,
                        remote: dst,
                        socket,
                        last: Instant::now(),
                    },
                );
                self.flow_by_tuple.insert((src, dst), token);
                self.counters.udp_flows.fetch_add(1, Ordering::Relaxed);
                token
            }
        };
        if let Some(flow) = self.flows.get_mut(&token) {
            flow.last = Instant::now();
            let _ = flow.socket.send(payload);
        }
    }

    fn evict_oldest_flow(&mut self) {
        if let Some(t) = self
            .flows
            .iter()
            .min_by_key(|(_, f)| f.last)
            .map(|(t, _)| *t)
        {
            self.remove_flow(t);
        }
    }

    fn remove_flow(&mut self, token: Token) {
        if let Some(mut flow) = self.flows.remove(&token) {
            self.flow_by_tuple.remove(&(flow.guest, flow.remote));
            let _ = self.poll.registry().deregister(&mut flow.socket);
            self.counters.udp_flows.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn read_flow(&mut self, token: Token) {
        let mut buf = [0u8; 65536];
        let mut datagrams = Vec::new();
        let Some(flow) = self.flows.get_mut(&token) else {
            return;
        };
        loop {
            match flow.socket.recv(&mut buf) {
                Ok(n) => datagrams.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock, or an ICMP error reported on the socket
            }
            if datagrams.len() >= 64 {
                break;
            }
        }
        flow.last = Instant::now();
        let (from, to) = (flow.remote, flow.guest);
        for d in datagrams {
            self.send_udp_to_guest(from, to, &d);
        }
        // More may be waiting; mio is edge-triggered, so look again next round.
        if self.flows.contains_key(&token) {
            let _ = self.waker.wake();
        }
    }

    fn send_udp_to_guest(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let Some(mac) = self.guest_mac else {
            return;
        };
        if payload.len() > udp::MAX_PAYLOAD {
            // A known gap: no IP fragmentation toward the guest, so such datagrams are lost.
            debug!(
                len = payload.len(),
                "dropping a UDP datagram too big for one frame"
            );
            self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let frame = packet::udp_frame(Topology::GATEWAY_MAC, mac, from, to, payload);
        self.device.send_frame(&frame);
    }

    fn on_dhcp(&mut self, payload: &[u8]) {
        let Some(reply) = self.dhcp.handle(payload) else {
            return;
        };
        if reply.is_lease {
            self.counters.dhcp_leases.fetch_add(1, Ordering::Relaxed);
        }
        let (ip, mac) = match reply.to {
            Destination::Broadcast => (Ipv4Addr::BROADCAST, [0xff; 6]),
            Destination::Unicast(ip, mac) => (ip, mac),
        };
        let frame = packet::udp_frame(
            Topology::GATEWAY_MAC,
            mac,
            SocketAddrV4::new(Topology::GATEWAY, 67),
            SocketAddrV4::new(ip, 68),
            &reply.payload,
        );
        self.device.send_frame(&frame);
    }

    // ---- DNS ----

    fn spawn_dns(&mut self, query: Vec<u8>, to: DnsReturn, transport: Transport) {
        if self.dns_in_flight >= MAX_DNS_IN_FLIGHT {
            debug!("too many DNS lookups in flight; dropping one");
            if let DnsReturn::Tcp { token } = to {
                self.on_dns_done(DnsDone {
                    to: DnsReturn::Tcp { token },
                    reply: None,
                });
            }
            return;
        }
        self.dns_in_flight += 1;
        let upstreams = self.config.upstreams.clone();
        let tx = self.dns_tx.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("usernet-dns".into())
            .spawn(move || {
                let reply = dns::answer(&query, &upstreams, transport);
                let _ = tx.send(DnsDone { to, reply });
                let _ = waker.wake();
            });
        if spawned.is_err() {
            self.dns_in_flight -= 1;
        }
    }

    fn on_dns_done(&mut self, done: DnsDone) {
        self.dns_in_flight = self.dns_in_flight.saturating_sub(1);
        match done.to {
            DnsReturn::Udp { guest } => {
                if let Some(reply) = done.reply {
                    self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                    let from = SocketAddrV4::new(Topology::GATEWAY, 53);
                    self.send_udp_to_guest(from, guest, &reply);
                }
            }
            DnsReturn::Tcp { token } => {
                if let Some(conn) = self.tcp.get_mut(&token) {
                    self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
                    conn.push_dns_reply(&done.reply.unwrap_or_default());
                }
            }
        }
    }

    // ---- port forwards ----

    pub fn add_forward(&mut self, mut f: PortForward) -> Result<PortForward> {
        let asked = f;
        let bind_err = move |source| NetworkError::BindForward {
            forward: asked,
            source,
        };
        let token = self.token();
        match f.protocol {
            Protocol::Tcp => {
                let mut l = TcpListener::bind(f.host_addr()).map_err(bind_err)?;
                f.host_port = l.local_addr().map_err(bind_err)?.port();
                self.poll
                    .registry()
                    .register(&mut l, token, Interest::READABLE)
                    .map_err(bind_err)?;
                self.tcp_forwards.insert(token, (f, l));
            }
            Protocol::Udp => {
                let mut s = UdpSocket::bind(f.host_addr()).map_err(bind_err)?;
                f.host_port = s.local_addr().map_err(bind_err)?.port();
                self.poll
                    .registry()
                    .register(&mut s, token, Interest::READABLE)
                    .map_err(bind_err)?;
                self.udp_forwards.insert(
                    token,
                    UdpForward {
                        forward: f,
                        socket: s,
                        peers: HashMap::new(),
                    },
                );
            }
        }
        info!(forward = %f, "port forward added");
        self.forward_list.lock().expect("forward list lock").push(f);
        Ok(f)
    }

    fn remove_forward(&mut self, f: &PortForward) -> Result<()> {
        let tcp = self
            .tcp_forwards
            .iter()
            .find(|(_, (g, _))| g == f)
            .map(|(t, _)| *t);
        let udp = self
            .udp_forwards
            .iter()
            .find(|(_, g)| g.forward == *f)
            .map(|(t, _)| *t);
        if let Some(t) = tcp {
            if let Some((_, mut l)) = self.tcp_forwards.remove(&t) {
                let _ = self.poll.registry().deregister(&mut l);
            }
        } else if let Some(t) = udp {
            if let Some(mut u) = self.udp_forwards.remove(&t) {
                let _ = self.poll.registry().deregister(&mut u.socket);
            }
            self.udp_forward_ports.retain(|_, (tok, _)| *tok != t);
        } else {
            return Err(NetworkError::NoSuchForward { forward: *f });
        }
        info!(forward = %f, "port forward removed");
        self.forward_list
            .lock()
            .expect("forward list lock")
            .retain(|g| g != f);
        Ok(())
    }

    fn gateway_port(&mut self) -> u16 {
        loop {
            self.next_gw_port = if self.next_gw_port >= 60999 {
                20000
            } else {
                self.next_gw_port + 1
            };
            let p = self.next_gw_port;
            let gw = SocketAddrV4::new(Topology::GATEWAY, p);
            let used = self.udp_forward_ports.contains_key(&p)
                || self.tcp_by_tuple.keys().any(|(_, remote)| *remote == gw);
            if !used {
                return p;
            }
        }
    }

    fn accept_forward(&mut self, token: Token) {
        loop {
            let Some((f, listener)) = self.tcp_forwards.get(&token) else {
                return;
            };
            let f = *f;
            let (mut stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "accept on a port forward failed");
                    return;
                }
            };
            if self.qemu.is_none() || self.tcp.len() >= MAX_TCP {
                continue; // dropping the stream closes it: nobody to forward to
            }
            let gw = SocketAddrV4::new(Topology::GATEWAY, self.gateway_port());
            let guest = SocketAddrV4::new(Topology::GUEST, f.guest_port);
            let mut sock = Self::new_socket();
            if sock
                .connect(
                    self.iface.context(),
                    (IpAddress::Ipv4(*guest.ip()), guest.port()),
                    gw.port(),
                )
                .is_err()
            {
                continue;
            }
            let handle = self.sockets.add(sock);
            let t = self.token();
            if self
                .poll
                .registry()
                .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.sockets.remove(handle);
                continue;
            }
            debug!(%peer, forward = %f, "forwarding a host connection");
            let mut conn = TcpConn::host((guest, gw), stream, None);
            conn.handle = Some(handle);
            self.add_tcp(t, conn);
        }
    }

    fn read_udp_forward(&mut self, token: Token) {
        let mut buf = [0u8; 65536];
        let mut datagrams = Vec::new();
        loop {
            let Some(fwd) = self.udp_forwards.get_mut(&token) else {
                return;
            };
            match fwd.socket.recv_from(&mut buf) {
                Ok((n, peer)) => datagrams.push((peer, buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
            if datagrams.len() >= 64 {
                let _ = self.waker.wake();
                break;
            }
        }
        for (peer, d) in datagrams {
            let known = self
                .udp_forwards
                .get(&token)
                .and_then(|f| f.peers.get(&peer).map(|p| p.0));
            let port = match known {
                Some(p) => p,
                None => {
                    let p = self.gateway_port();
                    self.udp_forward_ports.insert(p, (token, peer));
                    p
                }
            };
            let Some(fwd) = self.udp_forwards.get_mut(&token) else {
                return;
            };
            fwd.peers.insert(peer, (port, Instant::now()));
            let guest = SocketAddrV4::new(Topology::GUEST, fwd.forward.guest_port);
            self.send_udp_to_guest(SocketAddrV4::new(Topology::GATEWAY, port), guest, &d);
        }
    }

    // ---- timers ----

    fn housekeeping(&mut self) {
        self.last_housekeeping = Instant::now();
        let idle = self.config.udp_idle_timeout;
        let expired: Vec<Token> = self
            .flows
            .iter()
            .filter(|(_, f)| f.last.elapsed() >= idle)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.remove_flow(t);
        }
        let mut gone = Vec::new();
        for (token, fwd) in self.udp_forwards.iter_mut() {
            fwd.peers.retain(|_, (port, last)| {
                let keep = last.elapsed() < idle;
                if !keep {
                    gone.push((*token, *port));
                }
                keep
            });
        }
        for (_, port) in gone {
            self.udp_forward_ports.remove(&port);
        }
        let stale: Vec<(Token, Option<SegmentId>)> = self
            .tcp
            .iter()
            .filter_map(|(t, c)| match &c.peer {
                Peer::Host {
                    connected: false,
                    since,
                    syn,
                    ..
                } if since.elapsed() > CONNECT_TIMEOUT => {
                    Some((*t, syn.as_deref().and_then(syn_segment)))
                }
                _ => None,
            })
            .collect();
        for (t, seg) in stale {
            self.remove_tcp(t);
            if let Some(seg) = seg {
                self.refuse(&seg);
            }
        }
    }
}

/// The TCP fields of a SYN frame we queued ourselves (it parsed once already).
fn syn_segment(frame: &[u8]) -> Option<SegmentId> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(SegmentId {
        src: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
        seq: tcp.seq_number().0 as u32,
        ack: None,
        syn: true,
        fin: false,
        payload_len: tcp.payload().len(),
    })
}
