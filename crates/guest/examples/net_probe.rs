//! Test aid for the network tests: a static program run inside a real guest (busybox has no UDP
//! client and its `nc` cannot half-close). Prints one `OK ...` or `FAIL ...` line per command.
//!
//! ```text
//! net_probe dhcp MAC [TIMEOUT]        the agent's DHCP client; prints the lease
//! net_probe udp-echo IP:PORT N [SIZE] N datagrams of SIZE bytes (1000), each echoed byte-exact
//! net_probe tcp-send IP:PORT BYTES [line]
//!                                     sends BYTES, half-closes, prints the peer's reply (read to
//!                                     EOF, or only its first line with `line`)
//! net_probe flood-tcp IP:PORT N       N short connections (connect, one line, close)
//! net_probe flood-udp IP:PORT N       N one-datagram flows from N fresh sockets
//! net_probe udp-rtt IP:PORT N         N round trips of 64 bytes: p50 and p99 in microseconds
//! net_probe connect IP:PORT [SECS]    one TCP connect: `connected` or `refused in N ms`
//! net_probe dns-tcp IP:PORT NAME      an A query over TCP (RFC 7766): answer count and TC bit
//! net_probe httpd PORT DIR            serves DIR's files over HTTP/1.0 from a background process
//! ```
//!
//! `httpd` exists because busybox httpd listens with a backlog of 9: a burst of connects (a
//! hundred requests put in flight at once through a port forward) overflows the guest's accept
//! queue, and the dropped SYNs turn into retransmits or resets that say nothing about the
//! network backend under test. This one listens with a backlog of 1024 and serves every
//! connection on a thread of its own.

#[path = "../src/dhcp.rs"]
mod dhcp;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrIn};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let addr = || arg(1).parse::<SocketAddr>().expect("IP:PORT");
    let n = |i: usize| arg(i).parse::<usize>().expect("a count");
    let result = match arg(0).as_str() {
        "dhcp" => {
            let setup = boxlite_protocol::NetworkSetup {
                mac: arg(1),
                dhcp_timeout_secs: arg(2).parse().unwrap_or(20),
            };
            dhcp::configure(&setup).map(|ip| format!("lease {}", ip.unwrap_or_default()))
        }
        "udp-echo" => udp_echo(addr(), n(2), arg(3).parse().unwrap_or(1000)),
        "tcp-send" => tcp_send(addr(), n(2), arg(3) == "line"),
        "flood-tcp" => flood_tcp(addr(), n(2)),
        "flood-udp" => flood_udp(addr(), n(2)),
        "connect" => connect(addr(), arg(2).parse().unwrap_or(30)),
        "udp-rtt" => udp_rtt(addr(), n(2)),
        "dns-tcp" => dns_tcp(addr(), &arg(2)),
        "httpd" => httpd(arg(1).parse().expect("a port"), arg(2).into()),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(s) => println!("OK {} {s}", arg(0)),
        Err(e) => {
            println!("FAIL {} {e}", arg(0));
            std::process::exit(1);
        }
    }
}

fn udp_echo(to: SocketAddr, n: usize, size: usize) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        let msg: Vec<u8> = (0..size).map(|j| ((i * 7 + j) % 251) as u8).collect();
        s.send(&msg).map_err(|e| format!("send {i}: {e}"))?;
        let got = s.recv(&mut buf).map_err(|e| format!("reply {i}: {e}"))?;
        if buf[..got] != msg[..] {
            return Err(format!("reply {i} differs"));
        }
    }
    Ok(format!("{n} datagrams of {size} bytes echoed"))
}

fn tcp_send(to: SocketAddr, bytes: usize, line_only: bool) -> Result<String, String> {
    let mut s = TcpStream::connect(to).map_err(|e| e.to_string())?;
    let chunk: Vec<u8> = (0..65536).map(|j| (j % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len());
        s.write_all(&chunk[..k]).map_err(|e| e.to_string())?;
        left -= k;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    if line_only {
        let mut byte = [0u8; 1];
        while s.read(&mut byte).map_err(|e| e.to_string())? == 1 && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
    } else {
        s.read_to_end(&mut reply).map_err(|e| e.to_string())?;
    }
    Ok(String::from_utf8_lossy(&reply).trim().to_string())
}

fn flood_tcp(to: SocketAddr, n: usize) -> Result<String, String> {
    let mut ok = 0;
    for _ in 0..n {
        if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            let _ = s.write_all(b"x\n");
            let _ = s.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            ok += 1;
        }
    }
    Ok(format!("{ok}/{n} connections"))
}

fn flood_udp(to: SocketAddr, n: usize) -> Result<String, String> {
    let mut ok = 0;
    for i in 0..n {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        if s.send_to(format!("flow {i}").as_bytes(), to).is_ok() {
            let mut buf = [0u8; 100];
            if s.recv(&mut buf).is_ok() {
                ok += 1;
            }
        }
    }
    Ok(format!("{ok}/{n} flows"))
}

fn connect(to: SocketAddr, secs: u64) -> Result<String, String> {
    let t = std::time::Instant::now();
    match TcpStream::connect_timeout(&to, Duration::from_secs(secs)) {
        Ok(_) => Ok("connected".into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Ok(format!("refused in {} ms", t.elapsed().as_millis()))
        }
        Err(e) => Err(format!("{e} after {} ms", t.elapsed().as_millis())),
    }
}

fn dns_tcp(to: SocketAddr, name: &str) -> Result<String, String> {
    let mut q = vec![0xb0, 0x0c, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut s = TcpStream::connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    // Two queries pipelined on one connection; both answers must come back.
    framed.extend_from_within(..);
    s.write_all(&framed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for _ in 0..2 {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut r).map_err(|e| e.to_string())?;
        if r.len() < 12 || r[..2] != q[..2] {
            return Err("reply with a foreign ID".into());
        }
        let answers = u16::from_be_bytes([r[6], r[7]]);
        let tc = r[2] & 0x02 != 0;
        out.push(format!("answers={answers} tc={}", u8::from(tc)));
    }
    Ok(out.join(" "))
}

fn udp_rtt(to: SocketAddr, n: usize) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut rtts = Vec::with_capacity(n);
    let mut buf = [0u8; 128];
    for i in 0..n {
        let msg = [i as u8; 64];
        let t = std::time::Instant::now();
        s.send(&msg).map_err(|e| e.to_string())?;
        let got = s.recv(&mut buf).map_err(|e| format!("reply {i}: {e}"))?;
        if buf[..got] != msg[..] {
            return Err(format!("reply {i} differs"));
        }
        rtts.push(t.elapsed().as_micros());
    }
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    Ok(format!("p50_us={} p99_us={}", pct(50), pct(99)))
}

/// Binds `port` with a deep accept queue, then serves `dir` from a forked child; the parent
/// returns once the port listens, so the next command of a script can rely on it.
fn httpd(port: u16, dir: PathBuf) -> Result<String, String> {
    let listener = listen(port, 1024).map_err(|e| format!("listen on {port}: {e}"))?;
    // SAFETY: this process has a single thread here, so the child may do anything.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Parent { .. } => Ok(format!("listening on {port}")),
        nix::unistd::ForkResult::Child => {
            // Let go of the caller's stdout: a shell's `$(...)` waits for every writer to close.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd);
                }
            }
            for conn in listener.incoming().flatten() {
                let dir = dir.clone();
                std::thread::spawn(move || serve_one(conn, &dir));
            }
            std::process::exit(0);
        }
    }
}

fn listen(port: u16, backlog: i32) -> nix::Result<TcpListener> {
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sock::setsockopt(&fd, sock::sockopt::ReuseAddr, &true)?;
    sock::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, port),
    )?;
    sock::listen(&fd, sock::Backlog::new(backlog)?)?;
    Ok(TcpListener::from(fd))
}

/// Answers one `GET /NAME HTTP/1.x` with the file's bytes (or 404), then closes.
fn serve_one(mut conn: TcpStream, dir: &std::path::Path) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let req = String::from_utf8_lossy(&req);
    let mut words = req.split_whitespace();
    let body = match (words.next(), words.next()) {
        (Some("GET"), Some(path)) if !path.contains("..") => {
            std::fs::read(dir.join(path.trim_start_matches('/'))).ok()
        }
        _ => None,
    };
    let reply = match body {
        Some(body) => {
            let mut r = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        }
        None => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    };
    let _ = conn.write_all(&reply);
    // Close only after the client's FIN: a FIN arriving at an already closed socket whose
    // TIME_WAIT slot could not be had (a small guest runs out of them quickly) draws a reset.
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.read(&mut buf);
}
