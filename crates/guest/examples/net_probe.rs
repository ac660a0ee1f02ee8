//! Test aid for the network tests: a static program run inside a real guest (busybox has no UDP
//! client and its `nc` cannot half-close). Prints one `OK ...` or `FAIL ...` line per command.
//!
//! ```text
//! net_probe dhcp MAC [TIMEOUT]        the agent's DHCP client; prints the lease
//! net_probe udp-echo IP:PORT N        N datagrams, each echoed back byte-exact
//! net_probe tcp-send IP:PORT BYTES    sends BYTES, half-closes, prints the peer's reply line
//! net_probe flood-tcp IP:PORT N       N short connections (connect, one line, close)
//! net_probe flood-udp IP:PORT N       N one-datagram flows from N fresh sockets
//! ```

#[path = "../src/dhcp.rs"]
mod dhcp;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

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
        "udp-echo" => udp_echo(addr(), n(2)),
        "tcp-send" => tcp_send(addr(), n(2)),
        "flood-tcp" => flood_tcp(addr(), n(2)),
        "flood-udp" => flood_udp(addr(), n(2)),
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

fn udp_echo(to: SocketAddr, n: usize) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let msg: Vec<u8> = (0..1000).map(|j| ((i * 7 + j) % 251) as u8).collect();
        s.send(&msg).map_err(|e| format!("send {i}: {e}"))?;
        let got = s.recv(&mut buf).map_err(|e| format!("reply {i}: {e}"))?;
        if buf[..got] != msg[..] {
            return Err(format!("reply {i} differs"));
        }
    }
    Ok(format!("{n} datagrams echoed"))
}

fn tcp_send(to: SocketAddr, bytes: usize) -> Result<String, String> {
    let mut s = TcpStream::connect(to).map_err(|e| e.to_string())?;
    let chunk: Vec<u8> = (0..65536).map(|j| (j % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len());
        s.write_all(&chunk[..k]).map_err(|e| e.to_string())?;
        left -= k;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply.trim().to_string())
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
