//! Network benchmark (run by `bench/net.sh`; ignored in ordinary test runs): for each backend a
//! TCG guest measures TCP throughput both ways with iperf3 against a peer in a network
//! namespace, UDP round trips to the peer, and the host measures connect + request + response
//! latency of small HTTP requests through a port forward to the guest. Prints one table row per
//! backend (`BENCH|...`).

mod net_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite::net::{NetworkHandle, NetworkKind, NetworkOptions, PortForward};
use net_common::vm::{self, Guest, Netns};

const STEP: Duration = Duration::from_secs(180);

struct Iperf(Child);

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// The `Mbits/sec` of the receiver line of an iperf3 report.
fn mbits(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| w.ends_with("bits/sec"))
        .map(|i| format!("{} {}", words[i - 1], words[i]))
        .unwrap_or_else(|| "?".into())
}

fn bench(kind: NetworkKind) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create();
    let _iperf = Iperf(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "iperf3", "-s"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 installed"),
    );
    let mut ns = ns;
    let www = dir.path().join("peer-www");
    std::fs::create_dir_all(&www).unwrap();
    ns.start_servers(&www);

    let mut opts = NetworkOptions::new(kind, dir.path());
    opts.port_forwards = vec![PortForward::tcp(0, 80)];
    let (net, config) = NetworkHandle::start(opts).unwrap();
    let port = config.port_forwards[0].host_port;
    let peer = &ns.peer;
    let init = format!(
        "{}\
         echo \"IPERF-UP $(iperf3 -c {peer} -t 5 -f m | grep receiver)\"\n\
         echo \"IPERF-DOWN $(iperf3 -c {peer} -t 5 -f m -R | grep receiver)\"\n\
         echo \"MARK $(net_probe udp-rtt {peer}:7778 200)\"\n\
         httpd -p 80 -h /www\n\
         echo \"MARK ready\"\n{}",
        vm::INIT_HEAD,
        vm::INIT_TAIL
    );
    let initrd = vm::build_initramfs(
        dir.path(),
        &init,
        &[("small", b"hello from the guest\n".to_vec())],
        &[std::path::Path::new("/usr/bin/iperf3")],
    );
    let mut guest = Guest::boot(dir.path(), &initrd, &config.qemu_args());
    let up = guest.wait_for("IPERF-UP", STEP);
    let down = guest.wait_for("IPERF-DOWN", STEP);
    let udp = guest.wait_for("MARK OK udp-rtt", STEP);
    guest.wait_for("MARK ready", STEP);

    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /small HTTP/1.0\r\n\r\n").unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        assert!(resp.ends_with(b"hello from the guest\n"), "{resp:?}");
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    let udp_fields: Vec<&str> = udp.split_whitespace().skip(3).collect();
    let m = net.metrics();
    format!(
        "BENCH|{kind}|{}|{}|{:.2}|{:.2}|{}|{} MB in, {} MB out",
        mbits(&up),
        mbits(&down),
        percentile(&lat, 50),
        percentile(&lat, 99),
        udp_fields.join(" "),
        m.tx_bytes / 1_000_000,
        m.rx_bytes / 1_000_000,
    )
}

#[test]
#[ignore = "benchmark: run bench/net.sh"]
fn network_backends_benchmark() {
    let _lock = vm::vm_lock();
    let mut rows = Vec::new();
    // BOXLITE_BENCH_BACKENDS=usernet,passt limits the run.
    let only = std::env::var("BOXLITE_BENCH_BACKENDS").unwrap_or_default();
    for kind in [
        NetworkKind::Usernet,
        NetworkKind::Libslirp,
        NetworkKind::Passt,
    ] {
        if !only.is_empty() && !only.split(',').any(|k| k == kind.to_string()) {
            continue;
        }
        let row = bench(kind);
        println!("{row}");
        rows.push(row);
    }
    println!("\n| backend | TCP guest→peer | TCP peer→guest | HTTP via forward p50 ms | p99 ms | UDP RTT | frames seen by backend |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let cols: Vec<&str> = r.split('|').skip(1).collect();
        println!("| {} |", cols.join(" | "));
    }
}
