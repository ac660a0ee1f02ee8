//! `passt`: the Debian `passt` program as the Box's user-mode network, speaking the same
//! length-framed socket protocol as QEMU's `-netdev stream`.
//!
//! passt runs as a child process listening on a socket in a private directory (as root it drops
//! to `nobody`, so that directory is handed to nobody); QEMU connects to a socket of ours, and a
//! relay thread pair copies frames between the two while counting them, which gives this backend
//! the same byte and packet counters as the others. passt is told the Box topology (`-a
//! 192.168.127.2 -n 24 -g 192.168.127.1`). Port forwards become `-t`/`-u` options at start;
//! passt cannot change them while running.
//!
//! DNS: UDP queries to 192.168.127.1:53 never reach passt; the relay answers them with
//! usernet's forwarder ([`crate::net::gateway_dns`]), from the `--dns` servers or the host's
//! resolvers, whatever their address and port (passt 2023-03 reaches a loopback resolver only
//! at 127.0.0.1:53, so systemd-resolved's 127.0.0.53 was out of its reach). DNS over TCP to
//! the gateway is left to passt (`--dns-forward`, `-D` with the first port-53 IPv4 upstream).
//!
//! Host access: passt maps its gateway to the host's loopback unless `--no-map-gw`; the relay
//! presents that mapping to the guest as the host alias 192.168.127.254 and keeps the alias and
//! the gateway from leaking to the real network (see [`crate::net::host_alias`]).
//!
//! Lifetime: passt runs with `--one-off` and the relay connects to it at once, so passt quits
//! when that connection closes, which the kernel does when the shim ends however it ends (also
//! by SIGKILL, where no cleanup of ours runs). passt drops privileges, which clears a
//! parent-death signal, so that could not be relied on.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::net::framing::{encode_into, FrameDecoder};
use crate::net::gateway_dns::{self, Answerer};
use crate::net::host_alias::{HostAlias, Verdict};
use crate::net::{
    FrameCounters, NetworkBackend, NetworkConfig, NetworkError, NetworkKind, NetworkMetrics,
    NetworkOptions, PortForward, Protocol, Result, Topology,
};

/// UID/GID passt drops to when started as root (Debian's `nobody`).
const NOBODY: u32 = 65534;

#[derive(Debug)]
struct Running {
    child: Child,
    stop: Arc<AtomicBool>,
    relay: Option<JoinHandle<()>>,
    private_dir: PathBuf,
}

/// The passt backend.
#[derive(Debug)]
pub struct Passt {
    options: NetworkOptions,
    counters: Arc<FrameCounters>,
    forwards: Vec<PortForward>,
    running: Option<Running>,
}

impl Passt {
    pub fn new(options: NetworkOptions) -> Passt {
        Passt {
            options,
            counters: Arc::default(),
            forwards: Vec::new(),
            running: None,
        }
    }
}

fn spawn_err(reason: impl Into<String>, source: Option<io::Error>) -> NetworkError {
    NetworkError::Spawn {
        program: "passt".into(),
        reason: reason.into(),
        source,
    }
}

/// passt's `-t`/`-u` spec for one forward: `ADDR/HOSTPORT:GUESTPORT`.
fn forward_spec(f: &PortForward) -> String {
    format!("{}/{}:{}", f.host_ip, f.host_port, f.guest_port)
}

fn prepare_private_dir(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|source| NetworkError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).map_err(|source| {
            NetworkError::Io {
                what: format!("handing {} to nobody for passt", dir.display()),
                source,
            }
        })?;
    }
    Ok(())
}

impl NetworkBackend for Passt {
    fn start(&mut self) -> Result<NetworkConfig> {
        if self.running.is_some() {
            return Err(NetworkError::AlreadyRunning(NetworkKind::Passt));
        }
        let upstream = dns_upstream(&self.options);
        let path = self.options.socket_path()?;
        let private_dir = self.options.socket_dir.join("passt.d");
        let passt_sock = private_dir.join("s");
        prepare_private_dir(&private_dir)?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| NetworkError::BindSocket {
            path: path.clone(),
            source,
        })?;

        let forwards = self
            .options
            .port_forwards
            .iter()
            .map(|f| crate::net::resolve_port(*f))
            .collect::<Result<Vec<_>>>()?;
        let mut cmd = Command::new("passt");
        cmd.arg("--foreground")
            .arg("--quiet")
            .arg("--socket")
            .arg(&passt_sock)
            .args([
                "-4",
                "-a",
                "192.168.127.2",
                "-n",
                "24",
                "-g",
                "192.168.127.1",
            ])
            .args(["-m", &Topology::MTU.to_string()])
            .args([
                "--dns-forward",
                "192.168.127.1",
                "--no-dhcp-dns",
                "--one-off",
            ])
            .args(["-S", Topology::DOMAIN]);
        if let Some(ip) = upstream {
            cmd.arg("-D").arg(ip.to_string());
        }
        if !self.options.allow_host {
            cmd.arg("--no-map-gw");
        }
        // Debugging aid: passt writes the guest's traffic to this pcap file (as `nobody`).
        if let Some(pcap) = std::env::var_os("BOXLITE_PASST_PCAP") {
            cmd.arg("--pcap").arg(pcap);
        }
        for f in &forwards {
            let flag = match f.protocol {
                Protocol::Tcp => "-t",
                Protocol::Udp => "-u",
            };
            cmd.arg(flag).arg(forward_spec(f));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        debug!(?cmd, "starting passt");
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_err("cannot run the passt program (is it installed?)", Some(e)))?;

        let deadline = Instant::now() + Duration::from_secs(5);
        while !passt_sock.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(spawn_err(
                    format!("passt exited ({status}): {}", err.trim()),
                    None,
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(
                    format!(
                        "its socket {} did not appear within 5 s",
                        passt_sock.display()
                    ),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        // Connected now, not when the VMM comes: passt (--one-off) ends with this connection.
        let passt = match UnixStream::connect(&passt_sock) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err("cannot connect to its socket", Some(e)));
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let relay = {
            let stop = stop.clone();
            let counters = self.counters.clone();
            let alias = HostAlias::for_open_gateway(self.options.allow_host);
            let dns = Answerer::new(&self.options.dns);
            std::thread::Builder::new()
                .name("passt-relay".into())
                .spawn(move || accept_loop(listener, passt, &counters, &alias, &dns, &stop))
                .map_err(|e| spawn_err("cannot start the relay thread", Some(e)))?
        };
        self.forwards = forwards.clone();
        self.running = Some(Running {
            child,
            stop,
            relay: Some(relay),
            private_dir,
        });
        info!(socket = %path.display(), "passt started");
        Ok(NetworkConfig::user_mode(NetworkKind::Passt, path, forwards))
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut r) = self.running.take() {
            r.stop.store(true, Ordering::Relaxed);
            let _ = r.child.kill();
            let _ = r.child.wait();
            if let Some(t) = r.relay.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_dir_all(&r.private_dir);
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
        Err(NetworkError::Unsupported {
            backend: NetworkKind::Passt,
            what: format!("adding port forward {forward} while running"),
        })
    }

    fn remove_port_forward(&self, forward: &PortForward) -> Result<()> {
        Err(NetworkError::Unsupported {
            backend: NetworkKind::Passt,
            what: format!("removing port forward {forward} while running"),
        })
    }

    fn port_forwards(&self) -> Vec<PortForward> {
        self.forwards.clone()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The upstream resolver passt forwards the guest's DNS over TCP to: the first IPv4 `--dns`
/// server or host resolver on port 53 (passt has no port option); `None` leaves it to passt.
fn dns_upstream(options: &NetworkOptions) -> Option<std::net::IpAddr> {
    let candidates = if options.dns.is_empty() {
        crate::net::host_resolvers()
    } else {
        options.dns.clone()
    };
    candidates
        .into_iter()
        .find(|s| s.is_ipv4() && s.port() == 53)
        .map(|s| s.ip())
}

/// Accepts the VMM (once) and relays it to passt until either side closes or we are told to
/// stop.
fn accept_loop(
    listener: UnixListener,
    passt: UnixStream,
    counters: &Arc<FrameCounters>,
    alias: &HostAlias,
    dns: &Answerer,
    stop: &AtomicBool,
) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((vmm, _)) => {
                let _ = vmm.set_nonblocking(false);
                relay(vmm, passt, counters, alias, dns, stop);
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Copies frames both ways until either side closes; counts them as they pass, applies the
/// host alias and answers the guest's DNS queries to the gateway.
fn relay(
    vmm: UnixStream,
    passt: UnixStream,
    counters: &Arc<FrameCounters>,
    alias: &HostAlias,
    dns: &Answerer,
    stop: &AtomicBool,
) {
    let (Ok(vmm2), Ok(passt2)) = (vmm.try_clone(), passt.try_clone()) else {
        return;
    };
    // Frames toward the VMM come from passt and from the DNS workers: one writer at a time.
    let to_vmm = Arc::new(Mutex::new(vmm2));
    std::thread::scope(|s| {
        s.spawn(|| {
            copy_frames(
                &vmm,
                &mut |out| (&passt2).write_all(out),
                &|frame| {
                    counters.count_tx(frame.len());
                    if alias.outbound(frame) == Verdict::Drop {
                        return Verdict::Drop;
                    }
                    let Some(query) = gateway_dns::query(frame) else {
                        return Verdict::Pass;
                    };
                    let (to_vmm, counters) = (Arc::clone(&to_vmm), Arc::clone(counters));
                    dns.answer(query, move |frames| {
                        let mut out = Vec::new();
                        for frame in &frames {
                            counters.count_rx(frame.len());
                            encode_into(&mut out, frame);
                        }
                        let _ = to_vmm.lock().expect("vmm writer").write_all(&out);
                    });
                    Verdict::Drop
                },
                stop,
            );
            let _ = passt2.shutdown(std::net::Shutdown::Both);
        });
        copy_frames(
            &passt,
            &mut |out| to_vmm.lock().expect("vmm writer").write_all(out),
            &|frame| {
                counters.count_rx(frame.len());
                alias.inbound(frame);
                Verdict::Pass
            },
            stop,
        );
        let _ = to_vmm
            .lock()
            .expect("vmm writer")
            .shutdown(std::net::Shutdown::Both);
        let _ = vmm.shutdown(std::net::Shutdown::Both);
    });
}

/// Reads frames from `from`, lets `each` look at (and rewrite or drop) every one, and writes
/// the ones it passes with `to`.
fn copy_frames(
    mut from: &UnixStream,
    to: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    each: &dyn Fn(&mut [u8]) -> Verdict,
    stop: &AtomicBool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 65536];
    let mut decoder = FrameDecoder::new();
    let mut out = Vec::with_capacity(65536 + 4);
    while !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(_) => return,
        };
        decoder.push(&buf[..n]);
        out.clear();
        loop {
            match decoder.next_frame() {
                Ok(Some(mut frame)) => {
                    if each(&mut frame) == Verdict::Pass {
                        encode_into(&mut out, &frame);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() && to(&out).is_err() {
            return;
        }
    }
}
