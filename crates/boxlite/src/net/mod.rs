//! Network backends for a Box's NIC: `usernet` (ours, on smoltcp), `libslirp`, `passt` and `none`.
//!
//! Every backend serves one virtio-net NIC through QEMU's `-netdev stream` transport: the backend
//! listens on a unix stream socket, QEMU connects to it, and Ethernet frames travel each way as a
//! 4-byte big-endian length followed by the frame (see [`framing`]). The per-Box shim owns the
//! backend through a [`NetworkHandle`]: start it, read its metrics, add or remove port forwards
//! while the Box runs, stop it.
//!
//! The guest's addressing is the same for every backend that lets us choose it (see
//! [`Topology`]): subnet 192.168.127.0/24, gateway and DNS 192.168.127.1, guest 192.168.127.2 by
//! DHCP, and the host alias 192.168.127.254 (`host.boxlite.internal`), which reaches the host's
//! loopback only when the Box was created with `allow_host`.

pub mod framing;
mod gateway_dns;
mod host_alias;
pub mod libslirp;
pub mod passt;
pub mod usernet;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Errors of the network backends.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// cannot bind the backend's unix socket {path}
    #[error("cannot bind the network socket {path}")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the socket path does not fit `sun_path`
    #[error("network socket path {path} is too long for a unix socket ({len} bytes, limit 107)")]
    SocketPathTooLong { path: PathBuf, len: usize },
    /// a port forward's host side cannot be bound
    #[error("cannot bind port forward {forward}")]
    BindForward {
        forward: PortForward,
        #[source]
        source: std::io::Error,
    },
    /// the port forward to remove does not exist
    #[error("no port forward {forward} to remove")]
    NoSuchForward { forward: PortForward },
    /// an option the backend cannot honour
    #[error("the {backend} network backend does not support {what}")]
    Unsupported { backend: NetworkKind, what: String },
    /// a string is not a valid port forward
    #[error("invalid port forward {spec:?}: {reason}")]
    BadPortForward { spec: String, reason: String },
    /// a `--dns` value is not an address
    #[error("invalid DNS server {0:?} (expected IP or IP:PORT)")]
    BadDnsServer(String),
    /// a string is not a valid network kind
    #[error("unknown network backend {0:?} (expected usernet, libslirp, passt or none)")]
    BadKind(String),
    /// the backend is not running (not started yet, already stopped, or its thread died)
    #[error("the {0} network backend is not running")]
    NotRunning(NetworkKind),
    /// the backend was already started
    #[error("the {0} network backend is already running")]
    AlreadyRunning(NetworkKind),
    /// the helper program could not be started or failed to come up
    #[error("cannot start {program}: {reason}")]
    Spawn {
        program: String,
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// libslirp refused an operation
    #[error("libslirp: {0}")]
    Slirp(String),
    /// an I/O operation of the backend failed
    #[error("network backend I/O: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// Which backend serves the Box's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// Our user-mode stack (smoltcp), the default.
    #[default]
    Usernet,
    /// QEMU's user-mode stack, the C library libslirp, over FFI.
    Libslirp,
    /// The `passt` program.
    Passt,
    /// No NIC at all.
    None,
}

impl fmt::Display for NetworkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkKind::Usernet => "usernet",
            NetworkKind::Libslirp => "libslirp",
            NetworkKind::Passt => "passt",
            NetworkKind::None => "none",
        })
    }
}

impl FromStr for NetworkKind {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "usernet" => Ok(NetworkKind::Usernet),
            "libslirp" | "slirp" => Ok(NetworkKind::Libslirp),
            "passt" => Ok(NetworkKind::Passt),
            "none" => Ok(NetworkKind::None),
            other => Err(NetworkError::BadKind(other.to_string())),
        }
    }
}

/// Transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One host → guest port forward (`-p [IP:]HOSTPORT:GUESTPORT[/tcp|/udp]`).
///
/// ```
/// use boxlite::net::{PortForward, Protocol};
/// let f: PortForward = "8080:80".parse().unwrap();
/// assert_eq!((f.host_port, f.guest_port, f.protocol), (8080, 80, Protocol::Tcp));
/// assert_eq!(f.host_ip.to_string(), "127.0.0.1");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Host address to listen on; 127.0.0.1 unless given.
    pub host_ip: IpAddr,
    /// Host port; 0 picks a free port, and the backend reports the one it chose.
    pub host_port: u16,
    /// Port inside the guest.
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl PortForward {
    /// A TCP forward from 127.0.0.1:`host_port` to the guest's `guest_port`.
    pub fn tcp(host_port: u16, guest_port: u16) -> PortForward {
        PortForward {
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port,
            guest_port,
            protocol: Protocol::Tcp,
        }
    }

    /// A UDP forward from 127.0.0.1:`host_port` to the guest's `guest_port`.
    pub fn udp(host_port: u16, guest_port: u16) -> PortForward {
        PortForward {
            protocol: Protocol::Udp,
            ..PortForward::tcp(host_port, guest_port)
        }
    }

    /// The `[IP:]HOSTPORT:GUESTPORT/PROTO` form that [`FromStr`] reads back.
    pub fn to_spec(&self) -> String {
        let ip = match self.host_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        format!(
            "{ip}:{}:{}/{}",
            self.host_port, self.guest_port, self.protocol
        )
    }

    /// The host side as a socket address.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_addr(),
            self.guest_port,
            self.protocol
        )
    }
}

impl FromStr for PortForward {
    type Err = NetworkError;

    /// Parses `[IP:]HOSTPORT:GUESTPORT[/tcp|/udp]`; IPv6 host addresses go in brackets.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |reason: &str| NetworkError::BadPortForward {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (ports, protocol) = match spec.rsplit_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some(_) => return Err(bad("protocol must be tcp or udp")),
            None => (spec, Protocol::Tcp),
        };
        let (rest, guest) = ports
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOSTPORT:GUESTPORT"))?;
        let guest_port: u16 = guest.parse().map_err(|_| bad("bad guest port"))?;
        if guest_port == 0 {
            return Err(bad("guest port 0"));
        }
        let (host_ip, host) = match rest.rsplit_once(':') {
            Some((ip, port)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (ip.parse().map_err(|_| bad("bad host address"))?, port)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let host_port: u16 = host.parse().map_err(|_| bad("bad host port"))?;
        Ok(PortForward {
            host_ip,
            host_port,
            guest_port,
            protocol,
        })
    }
}

/// The fixed addressing of a Box network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology;

impl Topology {
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
    pub const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
    pub const HOST_ALIAS: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);
    pub const PREFIX_LEN: u8 = 24;
    pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    pub const HOST_ALIAS_NAME: &'static str = "host.boxlite.internal";
    pub const DOMAIN: &'static str = "boxlite.internal";
    pub const MTU: u16 = 1500;
    /// The MAC the guest's NIC gets unless the caller picks another.
    pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    /// The MAC our stack (usernet) answers with for the gateway and the host alias.
    pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0xc0, 0xa8, 0x7f, 0x01];
}

/// Frame counters of the backends that relay frames to a stack they do not own (libslirp,
/// passt): `tx` is from the guest, `rx` to it.
#[derive(Debug, Default)]
pub(crate) struct FrameCounters {
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_packets: AtomicU64,
}

impl FrameCounters {
    /// Counts one frame of `len` bytes from the guest.
    pub(crate) fn count_tx(&self, len: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts one frame of `len` bytes to the guest.
    pub(crate) fn count_rx(&self, len: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// The counts so far; the fields these backends cannot observe are unknown (`None`).
    pub(crate) fn metrics(&self) -> NetworkMetrics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetworkMetrics {
            tx_bytes: g(&self.tx_bytes),
            tx_packets: g(&self.tx_packets),
            rx_bytes: g(&self.rx_bytes),
            rx_packets: g(&self.rx_packets),
            ..NetworkMetrics::default()
        }
    }
}

/// `f` with a free host port in place of port 0 (bound, read and released), for the backends
/// that hand the port to a stack of their own (libslirp, passt).
pub(crate) fn resolve_port(f: PortForward) -> Result<PortForward> {
    if f.host_port != 0 {
        return Ok(f);
    }
    let addr = SocketAddr::new(f.host_ip, 0);
    let port = match f.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).and_then(|l| l.local_addr()),
        Protocol::Udp => std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr()),
    }
    .map_err(|source| NetworkError::BindForward { forward: f, source })?
    .port();
    Ok(PortForward {
        host_port: port,
        ..f
    })
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a backend is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOptions {
    pub kind: NetworkKind,
    /// Directory for the backend's unix socket (the Box folder, or a short runtime dir).
    pub socket_dir: PathBuf,
    /// Forwards set up at start.
    pub port_forwards: Vec<PortForward>,
    /// Upstream resolvers; empty means the host's `/etc/resolv.conf`. Port 53 unless given.
    pub dns: Vec<SocketAddr>,
    /// Let the guest reach the host's loopback through 192.168.127.254.
    pub allow_host: bool,
    /// Host name handed out by DHCP.
    pub hostname: Option<String>,
}

impl NetworkOptions {
    /// Default options for `kind`, with the socket in `socket_dir`.
    pub fn new(kind: NetworkKind, socket_dir: impl Into<PathBuf>) -> NetworkOptions {
        NetworkOptions {
            kind,
            socket_dir: socket_dir.into(),
            port_forwards: Vec::new(),
            dns: Vec::new(),
            allow_host: false,
            hostname: None,
        }
    }

    /// Where the backend's unix socket goes.
    pub fn socket_path(&self) -> Result<PathBuf> {
        let path = self.socket_dir.join(format!("net-{}.sock", self.kind));
        let len = path.as_os_str().len();
        if len > 107 {
            return Err(NetworkError::SocketPathTooLong { path, len });
        }
        Ok(path)
    }
}

/// What a started backend tells the VMM and the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub kind: NetworkKind,
    /// The unix socket QEMU connects to; `None` for `none` (no NIC).
    pub socket_path: Option<PathBuf>,
    /// MAC to give the guest's virtio-net device.
    pub guest_mac: String,
    pub guest_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// What the guest should use as resolvers (also handed out by DHCP).
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u16,
    /// The forwards in effect, with the host ports the backend picked for `host_port: 0`.
    pub port_forwards: Vec<PortForward>,
}

impl NetworkConfig {
    /// What a user-mode backend of `kind` listening on `socket_path` hands out: the Box
    /// [`Topology`], the gateway as resolver, and `port_forwards`.
    pub(crate) fn user_mode(
        kind: NetworkKind,
        socket_path: PathBuf,
        port_forwards: Vec<PortForward>,
    ) -> NetworkConfig {
        NetworkConfig {
            kind,
            socket_path: Some(socket_path),
            guest_mac: format_mac(Topology::GUEST_MAC),
            guest_ip: Topology::GUEST,
            gateway: Topology::GATEWAY,
            prefix_len: Topology::PREFIX_LEN,
            dns: vec![Topology::GATEWAY],
            mtu: Topology::MTU,
            port_forwards,
        }
    }

    /// QEMU arguments attaching the NIC to this backend (empty for `none`).
    pub fn qemu_args(&self) -> Vec<String> {
        let Some(path) = &self.socket_path else {
            return Vec::new();
        };
        vec![
            "-netdev".into(),
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                path.display()
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", self.guest_mac),
        ]
    }
}

/// Counters of one backend. The counters a backend cannot observe (libslirp and passt keep
/// their connections to themselves) are `None`, shown as unknown rather than as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMetrics {
    /// Bytes of Ethernet frames from the guest.
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Bytes of Ethernet frames to the guest.
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// TCP connections open now (NAT and forwards).
    pub tcp_connections: Option<u64>,
    /// TCP connections opened since start.
    pub tcp_connections_total: Option<u64>,
    /// UDP flows open now.
    pub udp_flows: Option<u64>,
    /// Guest connects refused (by the destination or by policy).
    pub refused_connects: Option<u64>,
    /// DHCP leases handed out (ACKs).
    pub dhcp_leases: Option<u64>,
    /// DNS queries answered.
    pub dns_queries: Option<u64>,
    /// Frames dropped as malformed or unsupported.
    pub dropped_frames: Option<u64>,
}

/// The interface every backend implements; the shim holds it through [`NetworkHandle`].
pub trait NetworkBackend: Send + Sync + fmt::Debug {
    /// Starts the backend: the socket is listening when this returns.
    fn start(&mut self) -> Result<NetworkConfig>;
    /// Stops the backend and frees its socket, threads and child processes. Idempotent.
    fn stop(&mut self) -> Result<()>;
    fn metrics(&self) -> NetworkMetrics;
    /// Adds a forward while running; returns it with the host port chosen.
    fn add_port_forward(&self, forward: PortForward) -> Result<PortForward>;
    fn remove_port_forward(&self, forward: &PortForward) -> Result<()>;
    fn port_forwards(&self) -> Vec<PortForward>;
}

/// Builds the backend `options.kind` names, not yet started.
pub fn backend(options: NetworkOptions) -> Box<dyn NetworkBackend> {
    match options.kind {
        NetworkKind::Usernet => Box::new(usernet::Usernet::new(options)),
        NetworkKind::Libslirp => Box::new(libslirp::Libslirp::new(options)),
        NetworkKind::Passt => Box::new(passt::Passt::new(options)),
        NetworkKind::None => Box::new(NoNetwork),
    }
}

/// The shim's owned handle on a running backend; stops it when dropped.
///
/// ```no_run
/// use boxlite::net::{NetworkHandle, NetworkKind, NetworkOptions, PortForward};
/// let mut opts = NetworkOptions::new(NetworkKind::Usernet, "/run/boxlite/b1");
/// opts.port_forwards.push(PortForward::tcp(0, 80));
/// let (net, config) = NetworkHandle::start(opts).unwrap();
/// println!("qemu {:?}, forward {}", config.qemu_args(), config.port_forwards[0]);
/// println!("{:?}", net.metrics());
/// ```
#[derive(Debug)]
pub struct NetworkHandle {
    backend: Box<dyn NetworkBackend>,
}

impl NetworkHandle {
    /// Builds and starts the backend `options.kind` names.
    pub fn start(options: NetworkOptions) -> Result<(NetworkHandle, NetworkConfig)> {
        let mut backend = backend(options);
        let config = backend.start()?;
        Ok((NetworkHandle { backend }, config))
    }

    pub fn metrics(&self) -> NetworkMetrics {
        self.backend.metrics()
    }

    pub fn add_port_forward(&self, forward: PortForward) -> Result<PortForward> {
        self.backend.add_port_forward(forward)
    }

    pub fn remove_port_forward(&self, forward: &PortForward) -> Result<()> {
        self.backend.remove_port_forward(forward)
    }

    pub fn port_forwards(&self) -> Vec<PortForward> {
        self.backend.port_forwards()
    }

    /// Stops the backend now (dropping the handle does the same, ignoring errors).
    pub fn stop(mut self) -> Result<()> {
        self.backend.stop()
    }
}

impl Drop for NetworkHandle {
    fn drop(&mut self) {
        let _ = self.backend.stop();
    }
}

/// `--network none`: no NIC, nothing to run.
#[derive(Debug)]
struct NoNetwork;

impl NetworkBackend for NoNetwork {
    fn start(&mut self) -> Result<NetworkConfig> {
        Ok(NetworkConfig {
            kind: NetworkKind::None,
            socket_path: None,
            guest_mac: String::new(),
            guest_ip: Ipv4Addr::UNSPECIFIED,
            gateway: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            dns: Vec::new(),
            mtu: 0,
            port_forwards: Vec::new(),
        })
    }
    fn stop(&mut self) -> Result<()> {
        Ok(())
    }
    fn metrics(&self) -> NetworkMetrics {
        NetworkMetrics::default()
    }
    fn add_port_forward(&self, forward: PortForward) -> Result<PortForward> {
        Err(NetworkError::Unsupported {
            backend: NetworkKind::None,
            what: format!("port forward {forward} (the Box has no network)"),
        })
    }
    fn remove_port_forward(&self, forward: &PortForward) -> Result<()> {
        Err(NetworkError::NoSuchForward { forward: *forward })
    }
    fn port_forwards(&self) -> Vec<PortForward> {
        Vec::new()
    }
}

/// The host's resolvers from `/etc/resolv.conf` (port 53), IPv4 and IPv6. `BOXLITE_RESOLV_CONF`
/// names another file to read them from (for a host whose resolvers live elsewhere, and tests).
pub fn host_resolvers() -> Vec<SocketAddr> {
    let path = std::env::var_os("BOXLITE_RESOLV_CONF")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_resolv_conf(&text)
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Parses a `--dns` value: `IP` (port 53) or `IP:PORT` / `[IPv6]:PORT`.
pub fn parse_dns_server(s: &str) -> Result<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| NetworkError::BadDnsServer(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_specs_parse() {
        let f: PortForward = "0.0.0.0:8080:80/udp".parse().unwrap();
        assert_eq!(f.host_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!((f.host_port, f.guest_port), (8080, 80));
        assert_eq!(f.protocol, Protocol::Udp);
        let f: PortForward = "[::1]:0:22".parse().unwrap();
        assert_eq!(f.host_ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(f.host_port, 0);
        for bad in ["80", "a:80", "1:2/sctp", "1:0", "x:1:2", "70000:1"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad} must not parse");
        }
    }

    #[test]
    fn none_backend_has_no_nic() {
        let opts = NetworkOptions::new(NetworkKind::None, "/nonexistent");
        let (net, config) = NetworkHandle::start(opts).unwrap();
        assert_eq!(config.socket_path, None);
        assert!(config.qemu_args().is_empty(), "the shim adds no netdev");
        assert!(net.add_port_forward(PortForward::tcp(0, 80)).is_err());
        assert_eq!(net.metrics(), NetworkMetrics::default());
        net.stop().unwrap();
    }

    #[test]
    fn socket_paths_must_fit_sun_path() {
        let deep = "/d".repeat(60);
        let opts = NetworkOptions::new(NetworkKind::Usernet, deep);
        assert!(matches!(
            opts.socket_path(),
            Err(NetworkError::SocketPathTooLong { .. })
        ));
        let c = NetworkConfig {
            kind: NetworkKind::Usernet,
            socket_path: Some("/run/b/net.sock".into()),
            guest_mac: "52:54:00:12:34:56".into(),
            guest_ip: Topology::GUEST,
            gateway: Topology::GATEWAY,
            prefix_len: 24,
            dns: vec![],
            mtu: 1500,
            port_forwards: vec![],
        };
        assert_eq!(
            c.qemu_args(),
            [
                "-netdev",
                "stream,id=net0,server=off,addr.type=unix,addr.path=/run/b/net.sock",
                "-device",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"
            ]
        );
    }

    #[test]
    fn resolv_conf_nameservers() {
        let got = parse_resolv_conf(
            "# c\nnameserver 10.0.0.1\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n",
        );
        assert_eq!(
            got,
            vec![
                "10.0.0.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            parse_dns_server("1.2.3.4").unwrap(),
            "1.2.3.4:53".parse().unwrap()
        );
        assert_eq!(
            parse_dns_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
    }
}
