//! `libslirp`: QEMU's user-mode network stack, the C library (Debian `libslirp0`, API of
//! libslirp 4.x, `libslirp.h`), driven over FFI by a thread of ours behind the same socket and
//! framing as usernet.
//!
//! The thread owns the `Slirp` instance (the library is not thread-safe): it polls QEMU's stream
//! socket, libslirp's own sockets (through `slirp_pollfds_fill`/`slirp_pollfds_poll`) and an
//! eventfd that wakes it for commands, and fires libslirp's timers. Port forwards use
//! `slirp_add_hostfwd`; a forward asking for host port 0 gets a free port picked by binding and
//! releasing it first (libslirp cannot report the port it chose).
//!
//! Addressing follows the Box topology: network 192.168.127.0/24, gateway and DNS
//! 192.168.127.1, DHCP from 192.168.127.2. libslirp sends connects to any address of its network
//! libslirp sends connects to its gateway (`vhost`) to the host's loopback, unless
//! `disable_host_loopback`, which is set unless the Box allows host access, and refuses other
//! addresses of its network. The host alias 192.168.127.254 is rewritten to the gateway on the
//! way in and back on the way out (see [`crate::net::host_alias`]), and since libslirp answers
//! ARP only for its own addresses, this backend answers ARP for the alias itself. The gateway
//! thus leads to the host's loopback too when host access is allowed; both are refused
//! otherwise.
//!
//! DNS: libslirp's own DNS is disabled, and its nameserver address is one nothing uses
//! (192.168.127.3): as the gateway, it would send every connect to the gateway to the host's
//! resolver. UDP queries to 192.168.127.1:53 are taken out of the frame stream before libslirp
//! sees them and answered by usernet's forwarder, from the `--dns` servers or the host's
//! resolvers (same upstream choice, EDNS-aware truncation, `host.boxlite.internal`). Known
//! shortcomings: DNS over TCP is not served (libslirp has no hook for it), so resolvers get TC
//! answers they cannot retry; and libslirp's DHCP offers 192.168.127.3 as resolver, which only
//! a guest that ignores the Box's /etc/resolv.conf would use.

use std::ffi::{c_char, c_int, c_void, CString};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::net::framing::FrameDecoder;
use crate::net::gateway_dns::{self, Answerer};
use crate::net::host_alias::{HostAlias, Verdict};
use crate::net::{
    FrameCounters, NetworkBackend, NetworkConfig, NetworkError, NetworkKind, NetworkMetrics,
    NetworkOptions, PortForward, Protocol, Result, Topology,
};

mod ffi {
    //! The few declarations of `libslirp.h` (libslirp 4.7) this backend uses.
    use std::ffi::{c_char, c_int, c_void};

    #[repr(C)]
    pub struct Slirp {
        _private: [u8; 0],
    }

    pub type WriteCb = unsafe extern "C" fn(*const c_void, usize, *mut c_void) -> isize;
    pub type TimerCb = unsafe extern "C" fn(*mut c_void);
    pub type AddPollCb = unsafe extern "C" fn(c_int, c_int, *mut c_void) -> c_int;
    pub type GetREventsCb = unsafe extern "C" fn(c_int, *mut c_void) -> c_int;

    pub const POLL_IN: c_int = 1;
    pub const POLL_OUT: c_int = 2;
    pub const POLL_PRI: c_int = 4;
    pub const POLL_ERR: c_int = 8;
    pub const POLL_HUP: c_int = 16;

    #[repr(C)]
    pub struct SlirpCb {
        pub send_packet: WriteCb,
        pub guest_error: unsafe extern "C" fn(*const c_char, *mut c_void),
        pub clock_get_ns: unsafe extern "C" fn(*mut c_void) -> i64,
        pub timer_new: unsafe extern "C" fn(TimerCb, *mut c_void, *mut c_void) -> *mut c_void,
        pub timer_free: unsafe extern "C" fn(*mut c_void, *mut c_void),
        pub timer_mod: unsafe extern "C" fn(*mut c_void, i64, *mut c_void),
        pub register_poll_fd: unsafe extern "C" fn(c_int, *mut c_void),
        pub unregister_poll_fd: unsafe extern "C" fn(c_int, *mut c_void),
        pub notify: unsafe extern "C" fn(*mut c_void),
        pub init_completed: Option<unsafe extern "C" fn(*mut Slirp, *mut c_void)>,
        pub timer_new_opaque:
            Option<unsafe extern "C" fn(c_int, *mut c_void, *mut c_void) -> *mut c_void>,
    }

    #[repr(C)]
    pub struct SlirpConfig {
        pub version: u32,
        pub restricted: c_int,
        pub in_enabled: bool,
        pub vnetwork: libc::in_addr,
        pub vnetmask: libc::in_addr,
        pub vhost: libc::in_addr,
        pub in6_enabled: bool,
        pub vprefix_addr6: libc::in6_addr,
        pub vprefix_len: u8,
        pub vhost6: libc::in6_addr,
        pub vhostname: *const c_char,
        pub tftp_server_name: *const c_char,
        pub tftp_path: *const c_char,
        pub bootfile: *const c_char,
        pub vdhcp_start: libc::in_addr,
        pub vnameserver: libc::in_addr,
        pub vnameserver6: libc::in6_addr,
        pub vdnssearch: *const *const c_char,
        pub vdomainname: *const c_char,
        pub if_mtu: usize,
        pub if_mru: usize,
        pub disable_host_loopback: bool,
        pub enable_emu: bool,
        pub outbound_addr: *const libc::sockaddr_in,
        pub outbound_addr6: *const libc::sockaddr_in6,
        pub disable_dns: bool,
        pub disable_dhcp: bool,
    }

    #[link(name = "slirp")]
    extern "C" {
        pub fn slirp_new(
            cfg: *const SlirpConfig,
            cb: *const SlirpCb,
            opaque: *mut c_void,
        ) -> *mut Slirp;
        pub fn slirp_cleanup(slirp: *mut Slirp);
        pub fn slirp_pollfds_fill(
            slirp: *mut Slirp,
            timeout: *mut u32,
            add_poll: AddPollCb,
            opaque: *mut c_void,
        );
        pub fn slirp_pollfds_poll(
            slirp: *mut Slirp,
            select_error: c_int,
            get_revents: GetREventsCb,
            opaque: *mut c_void,
        );
        pub fn slirp_input(slirp: *mut Slirp, pkt: *const u8, len: c_int);
        pub fn slirp_handle_timer(slirp: *mut Slirp, id: c_int, cb_opaque: *mut c_void);
        pub fn slirp_add_hostfwd(
            slirp: *mut Slirp,
            is_udp: c_int,
            host_addr: libc::in_addr,
            host_port: c_int,
            guest_addr: libc::in_addr,
            guest_port: c_int,
        ) -> c_int;
        pub fn slirp_remove_hostfwd(
            slirp: *mut Slirp,
            is_udp: c_int,
            host_addr: libc::in_addr,
            host_port: c_int,
        ) -> c_int;
    }
}

fn in_addr(ip: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(ip).to_be(),
    }
}

#[derive(Debug)]
enum Command {
    Add(PortForward, Sender<Result<PortForward>>),
    Remove(PortForward, Sender<Result<()>>),
    Stop,
}

#[derive(Debug)]
struct Running {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// The libslirp backend.
#[derive(Debug)]
pub struct Libslirp {
    options: NetworkOptions,
    counters: Arc<FrameCounters>,
    forwards: Arc<Mutex<Vec<PortForward>>>,
    running: Mutex<Option<Running>>,
}

impl Libslirp {
    pub fn new(options: NetworkOptions) -> Libslirp {
        Libslirp {
            options,
            counters: Arc::default(),
            forwards: Arc::default(),
            running: Mutex::new(None),
        }
    }

    fn command<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        {
            let running = self.running.lock().expect("libslirp handle lock");
            let r = running
                .as_ref()
                .ok_or(NetworkError::NotRunning(NetworkKind::Libslirp))?;
            r.commands
                .send(make(tx))
                .map_err(|_| NetworkError::NotRunning(NetworkKind::Libslirp))?;
            wake(&r.wake);
        }
        rx.recv()
            .map_err(|_| NetworkError::NotRunning(NetworkKind::Libslirp))?
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl NetworkBackend for Libslirp {
    fn start(&mut self) -> Result<NetworkConfig> {
        if self.running.lock().expect("libslirp handle lock").is_some() {
            return Err(NetworkError::AlreadyRunning(NetworkKind::Libslirp));
        }
        let path = self.options.socket_path()?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| NetworkError::BindSocket {
            path: path.clone(),
            source,
        })?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(NetworkError::Io {
                what: "creating an eventfd".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let wake_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });

        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let setup = LoopSetup {
            listener,
            wake: wake_fd.clone(),
            allow_host: self.options.allow_host,
            hostname: self.options.hostname.clone(),
            forwards: self.options.port_forwards.clone(),
            counters: self.counters.clone(),
            forward_list: self.forwards.clone(),
            dns: Answerer::new(&self.options.dns),
        };
        let thread = std::thread::Builder::new()
            .name("libslirp".into())
            .spawn(move || run(setup, cmd_rx, ready_tx))
            .map_err(|source| NetworkError::Io {
                what: "spawning the libslirp thread".into(),
                source,
            })?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(NetworkError::Slirp("the libslirp thread died".into())));
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        *self.running.lock().expect("libslirp handle lock") = Some(Running {
            commands: cmd_tx,
            wake: wake_fd,
            thread: Some(thread),
        });
        info!(socket = %path.display(), "libslirp started");
        Ok(NetworkConfig::user_mode(
            NetworkKind::Libslirp,
            path,
            self.port_forwards(),
        ))
    }

    fn stop(&mut self) -> Result<()> {
        let running = self.running.lock().expect("libslirp handle lock").take();
        if let Some(mut r) = running {
            let _ = r.commands.send(Command::Stop);
            wake(&r.wake);
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
            if let Ok(path) = self.options.socket_path() {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    fn metrics(&self) -> NetworkMetrics {
        self.counters.metrics()
    }

    fn add_port_forward(&self, forward: PortForward) -> Result<PortForward> {
        self.command(|tx| Command::Add(forward, tx))
    }

    fn remove_port_forward(&self, forward: &PortForward) -> Result<()> {
        let f = *forward;
        self.command(|tx| Command::Remove(f, tx))
    }

    fn port_forwards(&self) -> Vec<PortForward> {
        self.forwards.lock().expect("forward list lock").clone()
    }
}

impl Drop for Libslirp {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

struct LoopSetup {
    listener: UnixListener,
    wake: Arc<OwnedFd>,
    allow_host: bool,
    hostname: Option<String>,
    forwards: Vec<PortForward>,
    counters: Arc<FrameCounters>,
    forward_list: Arc<Mutex<Vec<PortForward>>>,
    /// Answers the guest's DNS queries to the gateway.
    dns: Answerer,
}

/// libslirp's nameserver address: one the guest is never told about (see the module doc).
const UNUSED_NAMESERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 3);

/// The ARP reply for a guest asking who has the host alias, which libslirp does not answer
/// itself. The MAC follows libslirp's scheme for its own addresses (52:55 and the IPv4 address).
fn alias_arp_reply(frame: &[u8]) -> Option<Vec<u8>> {
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
        EthernetRepr,
    };
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let arp = ArpPacket::new_checked(eth.payload()).ok()?;
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&arp).ok()?
    else {
        return None;
    };
    if target_protocol_addr != Topology::HOST_ALIAS {
        return None;
    }
    let [a, b, c, d] = Topology::HOST_ALIAS.octets();
    let alias_mac = EthernetAddress([0x52, 0x55, a, b, c, d]);
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: alias_mac,
        source_protocol_addr: Topology::HOST_ALIAS,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let eth_repr = EthernetRepr {
        src_addr: alias_mac,
        dst_addr: source_hardware_addr,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth_repr.buffer_len() + reply.buffer_len()];
    let mut out = EthernetFrame::new_unchecked(&mut buf[..]);
    eth_repr.emit(&mut out);
    reply.emit(&mut ArpPacket::new_unchecked(out.payload_mut()));
    Some(buf)
}

/// A libslirp timer: either an id for `slirp_handle_timer` or a plain callback.
struct Timer {
    id: c_int,
    cb: Option<ffi::TimerCb>,
    cb_opaque: *mut c_void,
    expire_ms: Option<i64>,
}

/// What libslirp's callbacks reach through their opaque pointer; lives on the loop thread.
struct CbState {
    qemu: Option<UnixStream>,
    alias: HostAlias,
    counters: Arc<FrameCounters>,
    start: Instant,
    timers: Vec<*mut Timer>,
    pollfds: Vec<libc::pollfd>,
}

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: opaque is the CbState the loop passed to slirp_new; it outlives the Slirp.
    let st = unsafe { &mut *(opaque as *mut CbState) };
    // SAFETY: libslirp passes a buffer of `len` readable bytes.
    let frame = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    if let Some(q) = st.qemu.as_mut() {
        let mut framed = Vec::with_capacity(len + 4);
        crate::net::framing::encode_into(&mut framed, frame);
        st.alias.inbound(&mut framed[4..]);
        if q.write_all(&framed).is_ok() {
            st.counters.count_rx(len);
        }
    }
    len as isize
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, _opaque: *mut c_void) {
    // SAFETY: libslirp passes a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) };
    debug!(message = %msg.to_string_lossy(), "libslirp: guest error");
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: see cb_send_packet.
    let st = unsafe { &*(opaque as *const CbState) };
    st.start.elapsed().as_nanos() as i64
}

fn new_timer(st: &mut CbState, t: Timer) -> *mut c_void {
    let p = Box::into_raw(Box::new(t));
    st.timers.push(p);
    p.cast()
}

unsafe extern "C" fn cb_timer_new(
    cb: ffi::TimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: see cb_send_packet.
    let st = unsafe { &mut *(opaque as *mut CbState) };
    let t = Timer {
        id: -1,
        cb: Some(cb),
        cb_opaque,
        expire_ms: None,
    };
    new_timer(st, t)
}

unsafe extern "C" fn cb_timer_new_opaque(
    id: c_int,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: see cb_send_packet.
    let st = unsafe { &mut *(opaque as *mut CbState) };
    let t = Timer {
        id,
        cb: None,
        cb_opaque,
        expire_ms: None,
    };
    new_timer(st, t)
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: see cb_send_packet.
    let st = unsafe { &mut *(opaque as *mut CbState) };
    let t = timer as *mut Timer;
    if let Some(i) = st.timers.iter().position(|p| *p == t) {
        st.timers.swap_remove(i);
        // SAFETY: the pointer came from Box::into_raw in new_timer and is freed once.
        drop(unsafe { Box::from_raw(t) });
    }
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_ms: i64, _opaque: *mut c_void) {
    // SAFETY: libslirp passes a timer it got from timer_new and has not freed.
    let t = unsafe { &mut *(timer as *mut Timer) };
    t.expire_ms = Some(expire_ms);
}

unsafe extern "C" fn cb_noop_fd(_fd: c_int, _opaque: *mut c_void) {}
unsafe extern "C" fn cb_notify(_opaque: *mut c_void) {}

unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: opaque is the CbState passed to slirp_pollfds_fill.
    let st = unsafe { &mut *(opaque as *mut CbState) };
    let mut ev = 0;
    if events & ffi::POLL_IN != 0 {
        ev |= libc::POLLIN;
    }
    if events & ffi::POLL_OUT != 0 {
        ev |= libc::POLLOUT;
    }
    if events & ffi::POLL_PRI != 0 {
        ev |= libc::POLLPRI;
    }
    st.pollfds.push(libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    });
    (st.pollfds.len() - 1) as c_int
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: opaque is the CbState passed to slirp_pollfds_poll.
    let st = unsafe { &*(opaque as *const CbState) };
    let Some(p) = st.pollfds.get(idx as usize) else {
        return 0;
    };
    let mut r = 0;
    if p.revents & libc::POLLIN != 0 {
        r |= ffi::POLL_IN;
    }
    if p.revents & libc::POLLOUT != 0 {
        r |= ffi::POLL_OUT;
    }
    if p.revents & libc::POLLPRI != 0 {
        r |= ffi::POLL_PRI;
    }
    if p.revents & libc::POLLERR != 0 {
        r |= ffi::POLL_ERR;
    }
    if p.revents & libc::POLLHUP != 0 {
        r |= ffi::POLL_HUP;
    }
    r
}

fn host_v4(f: &PortForward) -> Result<Ipv4Addr> {
    match f.host_ip {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(_) => Err(NetworkError::Unsupported {
            backend: NetworkKind::Libslirp,
            what: format!("IPv6 host address in port forward {f}"),
        }),
    }
}

fn add_hostfwd(slirp: *mut ffi::Slirp, f: PortForward) -> Result<PortForward> {
    let ip = host_v4(&f)?;
    let f = crate::net::resolve_port(f)?;
    // SAFETY: slirp is the live instance owned by this thread.
    let rc = unsafe {
        ffi::slirp_add_hostfwd(
            slirp,
            c_int::from(f.protocol == Protocol::Udp),
            in_addr(ip),
            c_int::from(f.host_port),
            in_addr(Topology::GUEST),
            c_int::from(f.guest_port),
        )
    };
    if rc < 0 {
        return Err(NetworkError::BindForward {
            forward: f,
            source: io::Error::last_os_error(),
        });
    }
    if f.protocol == Protocol::Tcp {
        deepen_accept_queue(SocketAddrV4::new(ip, f.host_port));
    }
    Ok(f)
}

/// How many connects a TCP forward's host socket queues before libslirp accepts them (the
/// kernel caps it at `net.core.somaxconn`); the same depth as usernet's forwards.
const FORWARD_BACKLOG: c_int = 1024;

/// libslirp listens for a TCP forward with a backlog of 1 (`tcpx_listen`) and accepts one
/// connection per poll round: a burst of host connects (a hundred requests at once) overflows
/// the accept queue, the kernel drops the handshakes it has no room for, and those clients wait
/// through SYN retransmits for seconds to minutes, some until a reset. Linux takes a second
/// `listen` on a listening socket as a new backlog, so the forward's socket, found by its
/// address among this process's descriptors (libslirp does not hand it out), gets a deep queue.
fn deepen_accept_queue(addr: SocketAddrV4) {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for fd in fds
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
    {
        if listening_at(fd) == Some(addr) {
            // SAFETY: listen(2) on a descriptor number; only a socket listening at the forward's
            // address, which only libslirp's socket can be, gets here.
            if unsafe { libc::listen(fd, FORWARD_BACKLOG) } == 0 {
                debug!(%addr, backlog = FORWARD_BACKLOG, "deepened the forward's accept queue");
                return;
            }
        }
    }
    warn!(%addr, "libslirp forward keeps its 1-deep accept queue: bursts of connects may stall");
}

/// The IPv4 address descriptor `fd` listens at, if it is a listening TCP socket.
fn listening_at(fd: RawFd) -> Option<SocketAddrV4> {
    let mut accepting: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`; a descriptor that is not
    // a socket (or no longer open) only makes it fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return None;
    }
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `sin`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut sin as *mut libc::sockaddr_in).cast(), &mut len) };
    if rc != 0 || c_int::from(sin.sin_family) != libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

fn run(setup: LoopSetup, commands: Receiver<Command>, ready: Sender<Result<()>>) {
    let hostname = CString::new(setup.hostname.clone().unwrap_or_default()).unwrap_or_default();
    let domain = CString::new(Topology::DOMAIN).expect("no NUL in the domain");
    // SAFETY: in6_addr is plain data; all-zero is the unspecified address.
    let zero6: libc::in6_addr = unsafe { std::mem::zeroed() };
    let cfg = ffi::SlirpConfig {
        version: 4,
        restricted: 0,
        in_enabled: true,
        vnetwork: in_addr(Ipv4Addr::new(192, 168, 127, 0)),
        vnetmask: in_addr(Topology::NETMASK),
        vhost: in_addr(Topology::GATEWAY),
        in6_enabled: false,
        vprefix_addr6: zero6,
        vprefix_len: 0,
        vhost6: zero6,
        vhostname: if setup.hostname.is_some() {
            hostname.as_ptr()
        } else {
            std::ptr::null()
        },
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(Topology::GUEST),
        vnameserver: in_addr(UNUSED_NAMESERVER),
        vnameserver6: zero6,
        vdnssearch: std::ptr::null(),
        vdomainname: domain.as_ptr(),
        if_mtu: usize::from(Topology::MTU),
        if_mru: usize::from(Topology::MTU),
        disable_host_loopback: !setup.allow_host,
        enable_emu: false,
        outbound_addr: std::ptr::null(),
        outbound_addr6: std::ptr::null(),
        disable_dns: true,
        disable_dhcp: false,
    };
    let callbacks = ffi::SlirpCb {
        send_packet: cb_send_packet,
        guest_error: cb_guest_error,
        clock_get_ns: cb_clock_get_ns,
        timer_new: cb_timer_new,
        timer_free: cb_timer_free,
        timer_mod: cb_timer_mod,
        register_poll_fd: cb_noop_fd,
        unregister_poll_fd: cb_noop_fd,
        notify: cb_notify,
        init_completed: None,
        timer_new_opaque: Some(cb_timer_new_opaque),
    };
    let mut st = Box::new(CbState {
        qemu: None,
        alias: HostAlias::for_policed_gateway(setup.allow_host),
        counters: setup.counters.clone(),
        start: Instant::now(),
        timers: Vec::new(),
        pollfds: Vec::new(),
    });
    let opaque: *mut c_void = (&mut *st as *mut CbState).cast();
    // SAFETY: cfg and callbacks are valid for the call; libslirp copies the config strings it
    // keeps. `st` (the opaque) outlives the instance: slirp_cleanup runs before it is dropped.
    let slirp = unsafe { ffi::slirp_new(&cfg, &callbacks, opaque) };
    if slirp.is_null() {
        let _ = ready.send(Err(NetworkError::Slirp("slirp_new failed".into())));
        return;
    }
    for f in &setup.forwards {
        match add_hostfwd(slirp, *f) {
            Ok(f) => setup
                .forward_list
                .lock()
                .expect("forward list lock")
                .push(f),
            Err(e) => {
                // SAFETY: slirp is live and not used after this.
                unsafe { ffi::slirp_cleanup(slirp) };
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    let _ = setup.listener.set_nonblocking(true);
    let _ = ready.send(Ok(()));

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 65536];
    // Frames of DNS answers, from the workers to this thread (the only one that may send).
    let (dns_tx, dns_rx) = mpsc::channel::<Vec<Vec<u8>>>();
    'outer: loop {
        // Our own descriptors first: QEMU (or the listener), then the wake eventfd.
        st.pollfds.clear();
        let qemu_fd: RawFd = match &st.qemu {
            Some(q) => q.as_raw_fd(),
            None => setup.listener.as_raw_fd(),
        };
        st.pollfds.push(libc::pollfd {
            fd: qemu_fd,
            events: libc::POLLIN,
            revents: 0,
        });
        st.pollfds.push(libc::pollfd {
            fd: setup.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout: u32 = 1000;
        // SAFETY: slirp is live; the callback only touches `st` through the opaque pointer.
        unsafe { ffi::slirp_pollfds_fill(slirp, &mut timeout, cb_add_poll, opaque) };
        let now_ms = st.start.elapsed().as_millis() as i64;
        for t in &st.timers {
            // SAFETY: timers in the list are live (freed ones are removed first).
            if let Some(exp) = unsafe { (**t).expire_ms } {
                timeout = timeout.min((exp - now_ms).clamp(0, 1000) as u32);
            }
        }
        // SAFETY: pollfds is a valid array of its length.
        let n = unsafe {
            libc::poll(
                st.pollfds.as_mut_ptr(),
                st.pollfds.len() as libc::nfds_t,
                timeout as c_int,
            )
        };
        let select_error = c_int::from(n < 0);
        let qemu_ready = st.pollfds[0].revents != 0;
        if st.pollfds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a u64 from our eventfd.
            unsafe { libc::read(setup.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        // SAFETY: as for slirp_pollfds_fill.
        unsafe { ffi::slirp_pollfds_poll(slirp, select_error, cb_get_revents, opaque) };

        if qemu_ready {
            if st.qemu.is_none() {
                if let Ok((s, _)) = setup.listener.accept() {
                    let _ = s.set_nonblocking(false);
                    info!("VMM connected to libslirp");
                    st.qemu = Some(s);
                }
            } else {
                // The VMM socket stays blocking (libslirp's send callback must never write half
                // a frame); poll said it is readable, so one read does not block.
                let r = st.qemu.as_mut().map(|q| q.read(&mut buf));
                match r {
                    Some(Ok(0)) | None | Some(Err(_)) => {
                        info!("VMM disconnected from libslirp");
                        st.qemu = None;
                        decoder = FrameDecoder::new();
                    }
                    Some(Ok(n)) => {
                        decoder.push(&buf[..n]);
                        while let Ok(Some(mut frame)) = decoder.next_frame() {
                            setup.counters.count_tx(frame.len());
                            if let Some(reply) = alias_arp_reply(&frame) {
                                // SAFETY: as for the DNS answers below.
                                unsafe {
                                    cb_send_packet(reply.as_ptr().cast(), reply.len(), opaque)
                                };
                                continue;
                            }
                            if st.alias.outbound(&mut frame) == Verdict::Drop {
                                continue;
                            }
                            if let Some(query) = gateway_dns::query(&frame) {
                                let (tx, wake_fd) = (dns_tx.clone(), setup.wake.clone());
                                setup.dns.answer(query, move |frames| {
                                    let _ = tx.send(frames);
                                    wake(&wake_fd);
                                });
                                continue;
                            }
                            // SAFETY: frame is a valid buffer of its length.
                            unsafe {
                                ffi::slirp_input(slirp, frame.as_ptr(), frame.len() as c_int)
                            };
                        }
                    }
                }
            }
        }

        let now_ms = st.start.elapsed().as_millis() as i64;
        let due: Vec<*mut Timer> = st
            .timers
            .iter()
            .copied()
            // SAFETY: timers in the list are live.
            .filter(|t| unsafe { (**t).expire_ms }.is_some_and(|e| e <= now_ms))
            .collect();
        for t in due {
            if !st.timers.contains(&t) {
                continue; // freed by an earlier timer's callback
            }
            // SAFETY: t is live (still in the list); the callback may free other timers.
            let (id, cb, cb_opaque) = unsafe {
                (*t).expire_ms = None;
                ((*t).id, (*t).cb, (*t).cb_opaque)
            };
            match cb {
                // SAFETY: a callback libslirp registered with its own opaque.
                Some(cb) => unsafe { cb(cb_opaque) },
                // SAFETY: slirp is live; id and cb_opaque are what it gave timer_new_opaque.
                None => unsafe { ffi::slirp_handle_timer(slirp, id, cb_opaque) },
            }
        }

        while let Ok(frames) = dns_rx.try_recv() {
            for frame in frames {
                // SAFETY: the same call libslirp makes; `opaque` is our live CbState.
                unsafe { cb_send_packet(frame.as_ptr().cast(), frame.len(), opaque) };
            }
        }

        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Stop => break 'outer,
                Command::Add(f, reply) => {
                    let r = add_hostfwd(slirp, f);
                    if let Ok(f) = &r {
                        setup
                            .forward_list
                            .lock()
                            .expect("forward list lock")
                            .push(*f);
                    }
                    let _ = reply.send(r);
                }
                Command::Remove(f, reply) => {
                    let listed = setup
                        .forward_list
                        .lock()
                        .expect("forward list lock")
                        .contains(&f);
                    let r = match host_v4(&f) {
                        Ok(ip) if listed => {
                            // SAFETY: slirp is live.
                            let rc = unsafe {
                                ffi::slirp_remove_hostfwd(
                                    slirp,
                                    c_int::from(f.protocol == Protocol::Udp),
                                    in_addr(ip),
                                    c_int::from(f.host_port),
                                )
                            };
                            if rc < 0 {
                                warn!(forward = %f, "libslirp did not find the forward");
                            }
                            setup
                                .forward_list
                                .lock()
                                .expect("forward list lock")
                                .retain(|g| *g != f);
                            Ok(())
                        }
                        Ok(_) => Err(NetworkError::NoSuchForward { forward: f }),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
            }
        }
    }
    // SAFETY: slirp is live and not used afterwards; it frees its timers through timer_free.
    unsafe { ffi::slirp_cleanup(slirp) };
    for t in st.timers.drain(..) {
        // SAFETY: timers libslirp did not free are still ours, each freed once.
        drop(unsafe { Box::from_raw(t) });
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    /// A socket listening on a free loopback port with libslirp's backlog of 1.
    fn listen_like_libslirp() -> (OwnedFd, SocketAddrV4) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound an IPv4 address")
        };
        let fd = OwnedFd::from(listener);
        // SAFETY: listen(2) on a socket we own.
        assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
        (fd, addr)
    }

    fn connects(addr: SocketAddrV4, n: usize) -> (Vec<TcpStream>, usize) {
        let mut open = Vec::new();
        let mut failed = 0;
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)) {
                Ok(s) => open.push(s),
                Err(_) => failed += 1,
            }
        }
        (open, failed)
    }

    #[test]
    fn a_forward_socket_is_found_by_address_and_queues_a_burst() {
        let (fd, addr) = listen_like_libslirp();
        assert_eq!(listening_at(fd.as_raw_fd()), Some(addr));

        let (_before, failed) = connects(addr, 4);
        assert!(
            failed > 0,
            "a backlog of 1 holds at most 2 unaccepted connects"
        );

        deepen_accept_queue(addr);
        let (after, failed) = connects(addr, 100);
        assert_eq!(failed, 0, "100 unaccepted connects fit after deepening");
        assert_eq!(after.len(), 100);
    }
}
