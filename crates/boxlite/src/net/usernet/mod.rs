//! `usernet`, boxlite's own user-mode network stack (the role gvproxy plays elsewhere).
//!
//! One thread per Box runs an event loop (mio) around a smoltcp interface that plays the
//! gateway (192.168.127.1) and the host alias (192.168.127.254). The guest's frames arrive over
//! QEMU's stream socket; the loop answers DHCP ([`dhcp`]) and DNS ([`dns`]) itself, NATs guest
//! TCP connections and UDP flows to host sockets ([`tcp`], [`udp`]), and forwards host ports to
//! the guest. Policy ([`policy`]) keeps the host's loopback out of reach unless the Box was
//! created with `allow_host`.
//!
//! IPv4 only: IPv6 frames from the guest are dropped (the guest keeps its link-local address
//! and nothing routes beyond it). UDP and ICMP bigger than one frame travel as IPv4 fragments
//! both ways ([`reassembly`] for the guest's). ICMP beyond the gateway needs unprivileged ping
//! sockets (`net.ipv4.ping_group_range`); that gap is marked where it lives.
//!
//! The shim drives the thread through [`Usernet`]: commands (port forwards, stop) go over a
//! channel with a mio waker; counters are shared atomics.

mod device;
pub mod dhcp;
pub mod dns;
pub mod packet;
mod policy;
pub mod reassembly;
mod stack;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::net::{
    host_resolvers, NetworkBackend, NetworkConfig, NetworkError, NetworkKind, NetworkMetrics,
    NetworkOptions, PortForward, Result,
};

/// How long a NAT'ed UDP flow lives without traffic.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Live counters, shared between the stack thread and the handle.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub tx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_connections_total: AtomicU64,
    pub udp_flows: AtomicU64,
    pub refused_connects: AtomicU64,
    pub dhcp_leases: AtomicU64,
    pub dns_queries: AtomicU64,
    pub dropped_frames: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> NetworkMetrics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetworkMetrics {
            tx_bytes: g(&self.tx_bytes),
            tx_packets: g(&self.tx_packets),
            rx_bytes: g(&self.rx_bytes),
            rx_packets: g(&self.rx_packets),
            tcp_connections: Some(g(&self.tcp_connections)),
            tcp_connections_total: Some(g(&self.tcp_connections_total)),
            udp_flows: Some(g(&self.udp_flows)),
            refused_connects: Some(g(&self.refused_connects)),
            dhcp_leases: Some(g(&self.dhcp_leases)),
            dns_queries: Some(g(&self.dns_queries)),
            dropped_frames: Some(g(&self.dropped_frames)),
        }
    }
}

/// Requests from the handle to the stack thread.
#[derive(Debug)]
pub(crate) enum Command {
    AddForward(PortForward, Sender<Result<PortForward>>),
    RemoveForward(PortForward, Sender<Result<()>>),
    Stop,
}

/// What the stack needs to know besides its sockets.
#[derive(Debug, Clone)]
pub(crate) struct StackConfig {
    pub allow_host: bool,
    pub upstreams: Vec<SocketAddr>,
    pub hostname: Option<String>,
    pub udp_idle_timeout: Duration,
}

#[derive(Debug)]
struct Running {
    commands: Sender<Command>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
}

/// The usernet backend.
#[derive(Debug)]
pub struct Usernet {
    options: NetworkOptions,
    udp_idle_timeout: Duration,
    counters: Arc<Counters>,
    forwards: Arc<Mutex<Vec<PortForward>>>,
    running: Mutex<Option<Running>>,
}

impl Usernet {
    pub fn new(options: NetworkOptions) -> Usernet {
        Usernet {
            options,
            udp_idle_timeout: UDP_IDLE_TIMEOUT,
            counters: Arc::default(),
            forwards: Arc::default(),
            running: Mutex::new(None),
        }
    }

    /// Shortens (or lengthens) how long idle UDP flows are kept; before `start`.
    pub fn set_udp_idle_timeout(&mut self, timeout: Duration) {
        self.udp_idle_timeout = timeout;
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let running = self.running.lock().expect("usernet handle lock");
        let r = running
            .as_ref()
            .ok_or(NetworkError::NotRunning(NetworkKind::Usernet))?;
        r.commands
            .send(cmd)
            .map_err(|_| NetworkError::NotRunning(NetworkKind::Usernet))?;
        let _ = r.waker.wake();
        Ok(())
    }
}

impl NetworkBackend for Usernet {
    fn start(&mut self) -> Result<NetworkConfig> {
        if self.running.lock().expect("usernet handle lock").is_some() {
            return Err(NetworkError::AlreadyRunning(NetworkKind::Usernet));
        }
        raise_fd_limit();
        let path = self.options.socket_path()?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| NetworkError::BindSocket {
            path: path.clone(),
            source,
        })?;

        let upstreams = if self.options.dns.is_empty() {
            host_resolvers()
        } else {
            self.options.dns.clone()
        };
        if upstreams.is_empty() {
            warn!("no DNS resolvers on the host: guest lookups will get SERVFAIL");
        }
        let config = StackConfig {
            allow_host: self.options.allow_host,
            upstreams,
            hostname: self.options.hostname.clone(),
            udp_idle_timeout: self.udp_idle_timeout,
        };
        let mut stack = stack::Stack::new(
            listener,
            config,
            self.counters.clone(),
            self.forwards.clone(),
        )?;
        for f in &self.options.port_forwards {
            stack.add_forward(*f)?;
        }
        let waker = stack.waker();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("usernet".into())
            .spawn(move || stack.run(rx))
            .map_err(|source| NetworkError::Io {
                what: "spawning the usernet thread".into(),
                source,
            })?;
        *self.running.lock().expect("usernet handle lock") = Some(Running {
            commands: tx,
            waker,
            thread: Some(thread),
        });
        info!(socket = %path.display(), "usernet started");
        Ok(NetworkConfig::user_mode(
            NetworkKind::Usernet,
            path,
            self.port_forwards(),
        ))
    }

    fn stop(&mut self) -> Result<()> {
        let running = self.running.lock().expect("usernet handle lock").take();
        if let Some(mut r) = running {
            let _ = r.commands.send(Command::Stop);
            let _ = r.waker.wake();
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
            if let Ok(path) = self.options.socket_path() {
                let _ = std::fs::remove_file(path);
            }
            info!("usernet stopped");
        }
        Ok(())
    }

    fn metrics(&self) -> NetworkMetrics {
        self.counters.snapshot()
    }

    fn add_port_forward(&self, forward: PortForward) -> Result<PortForward> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::AddForward(forward, tx))?;
        rx.recv()
            .map_err(|_| NetworkError::NotRunning(NetworkKind::Usernet))?
    }

    fn remove_port_forward(&self, forward: &PortForward) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::RemoveForward(*forward, tx))?;
        rx.recv()
            .map_err(|_| NetworkError::NotRunning(NetworkKind::Usernet))?
    }

    fn port_forwards(&self) -> Vec<PortForward> {
        self.forwards.lock().expect("forward list lock").clone()
    }
}

/// Descriptors the stack may hold at once: TCP connections, UDP flows, ping sockets, forwards.
const FD_BUDGET: libc::rlim_t = (stack::MAX_TCP + 2 * udp::MAX_FLOWS + 256) as libc::rlim_t;

/// Raises this process's soft descriptor limit to cover [`FD_BUDGET`] (as far as the hard limit
/// allows); the stack runs inside the per-Box shim, which owns its process.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want: libc::rlim_t = lim.rlim_cur.max(FD_BUDGET).min(lim.rlim_max);
    if want > lim.rlim_cur {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            warn!("cannot raise the descriptor limit; busy guests may see refused connects");
        }
    }
}

impl Drop for Usernet {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
