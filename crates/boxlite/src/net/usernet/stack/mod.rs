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
//! - ICMP echo to the gateway or the host alias is answered by smoltcp; echo requests to other
//!   destinations go out through unprivileged ping sockets; other ICMP is dropped.
//! - Fragmented UDP and ICMP is reassembled first (bounded, see `reassembly`).
//!
//! The work is split by concern into `tcp_nat`, `udp_nat` (with DHCP and ICMP), `dns_relay` and
//! `forwards`; this file holds the loop, the VMM side and the classification above.
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
    Icmpv4Message, Icmpv4Packet, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet,
    TcpPacket, UdpPacket,
};
use tracing::{debug, info, warn};

use super::device::{self, QueueDevice};
use super::dhcp::{Destination, DhcpConfig, DhcpServer};
use super::dns::{self, Transport};
use super::packet::{self, SegmentId};
use super::policy::{self, Target};
use super::reassembly::Reassembler;
use super::tcp::{Peer, Pumped, TcpConn};
use super::udp::{self, IcmpFlow, UdpFlow, UdpForward};
use super::{Command, Counters, StackConfig};
use crate::net::framing::FrameDecoder;
use crate::net::{NetworkError, PortForward, Protocol, Result, Topology};

mod dns_relay;
mod forwards;
mod tcp_nat;
mod udp_nat;

use tcp_nat::syn_segment;

/// Most TCP connections (NAT, forwards, DNS) at once; further SYNs are reset.
pub const MAX_TCP: usize = 1024;
/// Most DNS lookups waiting on upstreams at once; further UDP queries are dropped.
pub const MAX_DNS_IN_FLIGHT: usize = 64;
/// How long a guest SYN may wait for the host connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames queued for smoltcp before we stop reading QEMU's socket for a while.
const MAX_RX_QUEUE: usize = 512;
const TCP_BUFFER: usize = 256 * 1024;

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
    pings: HashMap<Token, IcmpFlow>,
    ping_by_key: HashMap<(Ipv4Addr, Ipv4Addr, u16), Token>,
    ping_denied: bool,
    tcp_forwards: HashMap<Token, (PortForward, TcpListener)>,
    udp_forwards: HashMap<Token, UdpForward>,
    /// Gateway port → (UDP forward, host peer) for guest replies to forwarded datagrams.
    udp_forward_ports: HashMap<u16, (Token, SocketAddr)>,

    dns_tx: Sender<DnsDone>,
    dns_rx: Receiver<DnsDone>,
    dns_in_flight: usize,
    last_housekeeping: Instant,
    /// Datagram sockets that stopped reading at the batch limit: read again next round.
    pending_reads: Vec<Token>,
    /// IPv4 identification of the next fragmented datagram toward the guest.
    next_ip_ident: u16,
    reassembler: Reassembler,
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
            pings: HashMap::new(),
            ping_by_key: HashMap::new(),
            ping_denied: false,
            tcp_forwards: HashMap::new(),
            udp_forwards: HashMap::new(),
            udp_forward_ports: HashMap::new(),
            dns_tx,
            dns_rx,
            dns_in_flight: 0,
            last_housekeeping: Instant::now(),
            pending_reads: Vec::new(),
            next_ip_ident: 0,
            reassembler: Reassembler::default(),
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
            for token in std::mem::take(&mut self.pending_reads) {
                self.on_event(token, true, false);
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
        if !self.device.rx.is_empty()
            || !self.pending_reads.is_empty()
            || (self.qemu_readable && self.device.rx.len() < MAX_RX_QUEUE)
        {
            return Duration::ZERO;
        }
        if self.device.out.len() > device::BACKPRESSURE {
            // smoltcp wants to send but may not: wait for QEMU to take frames (a writable event).
            return Duration::from_millis(500);
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
                } else if self.pings.contains_key(&t) {
                    self.read_ping(t);
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
        if !ip.verify_checksum() {
            return false;
        }
        if ip.more_frags() || ip.frag_offset() != 0 {
            // UDP and ICMP are reassembled here; fragmented TCP (guests send TCP with DF set)
            // would go to smoltcp bigger than its MTU and is dropped.
            if ip.next_header() == IpProtocol::Tcp {
                return false;
            }
            if let Some(whole) = self.reassembler.push(&ip) {
                let mut f = frame[..14].to_vec();
                f.extend_from_slice(&whole);
                return self.classify_ipv4(&f, &f[14..]);
            }
            return true;
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
                policy::valid_guest_source(src) && self.on_guest_ping(src, dst, ip.payload())
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

    // ---- timers ----

    fn housekeeping(&mut self) {
        self.last_housekeeping = Instant::now();
        self.reassembler.expire();
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
        let idle_pings: Vec<Token> = self
            .pings
            .iter()
            .filter(|(_, f)| f.last.elapsed() >= idle)
            .map(|(t, _)| *t)
            .collect();
        for t in idle_pings {
            if let Some(mut f) = self.pings.remove(&t) {
                self.ping_by_key.remove(&(f.guest, f.remote, f.guest_id));
                let _ = self.poll.registry().deregister(&mut f.socket);
            }
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
