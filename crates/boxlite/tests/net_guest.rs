//! Real-guest tests of the network backends: a Debian kernel under QEMU (TCG) with a busybox
//! initramfs gets its address by DHCP (our agent's client and busybox udhcpc), resolves names,
//! talks TCP and UDP to servers in a network namespace, and serves HTTP through port forwards
//! (1000 sequential and 100 concurrent requests, every body byte-exact); the backends' byte
//! counters are compared with the guest NIC's own. usernet also takes a guest flood (10 000 short
//! TCP connections, 2 000 UDP flows) and must give back every descriptor and its memory.
//!
//! Needs root (network namespaces), qemu-system-x86_64, busybox-static, cpio, passt, python3 and
//! the kernel from `scripts/fetch-kernel.sh`. One boot per backend; the tests run one at a time.

mod net_common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use boxlite::net::usernet::Usernet;
use boxlite::net::{
    NetworkBackend, NetworkConfig, NetworkHandle, NetworkKind, NetworkOptions, PortForward,
};
use net_common::vm::{self, Guest, Netns};
use net_common::{run_case, StubDns};
use sha2::{Digest, Sha256};

const BOOT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(90);
/// Short TCP connections and one-datagram UDP flows of the usernet flood.
const FLOOD_TCP: usize = 10_000;
const FLOOD_UDP: usize = 2_000;
/// usernet's UDP idle timeout in the test (60 s by default).
const UDP_IDLE: Duration = Duration::from_secs(2);

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What `net_probe tcp-send` sends: a 65536-byte pattern repeated, cut at `len`.
fn tcp_send_pattern(len: usize) -> Vec<u8> {
    let chunk: Vec<u8> = (0..65536).map(|j| (j % 251) as u8).collect();
    chunk.iter().copied().cycle().take(len).collect()
}

struct Scenario {
    /// nslookup through the DNS override (a stub upstream from case 23).
    dns: bool,
    /// DNS over TCP and the host alias refusal: what only usernet serves.
    usernet_extras: bool,
    flood: bool,
    /// The backend relays the peer's FIN after the guest half-closed (passt 2023-03 does not:
    /// the reply arrives, the EOF never does).
    eof_after_half_close: bool,
    /// The gateway refuses connects to ports it does not serve (case 27).
    gateway_refused: bool,
    /// A connect the peer refuses reaches the guest as a reset (passt 2023-03 lets it time out).
    relays_refusal: bool,
    /// UDP datagrams bigger than the MTU (IPv4 fragments both ways) arrive whole (passt
    /// 2023-03 returns them mangled).
    big_udp: bool,
}

/// busybox nslookup through the DNS override and of the host alias name.
fn check_dns(guest: &mut Guest) {
    let small = guest.wait_for("MARK nslookup-small", STEP);
    assert!(
        small.contains("198.51.100.200"),
        "stub upstream via --dns: {small}"
    );
    let host = guest.wait_for("MARK nslookup-host", STEP);
    assert!(
        host.contains("192.168.127.254"),
        "host.boxlite.internal: {host}"
    );
}

/// Asserts that the guest's connect `who` failed promptly: refused (RST) or unreachable (ICMP),
/// never a hang (case 27).
fn check_refused(guest: &mut Guest, who: &str) {
    let c = guest.wait_for(&format!("MARK {who}"), STEP);
    let prompt = c.starts_with(&format!("MARK {who} OK connect refused in "))
        || (c.contains("unreachable") && c.contains(" after "));
    assert!(prompt, "the connect to {who} must fail at once: {c}");
    let ms: u64 = c
        .trim_end_matches(" ms")
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {c}"));
    assert!(ms < 2000, "failed promptly: {c}");
}

fn init_script(peer: &str, s: &Scenario) -> String {
    let line = if s.eof_after_half_close { "" } else { "line" };
    let timeout = if s.relays_refusal { "" } else { "3" };
    let big_udp = 8000;
    let mut init = vm::INIT_HEAD.to_string();
    init += &format!(
        "echo \"MARK wget $(wget -q -O - http://{peer}:8080/blob | sha256sum)\"\n\
         echo \"MARK $(net_probe tcp-send {peer}:7777 3000000 {line})\"\n\
         echo \"MARK $(net_probe udp-echo {peer}:7778 20)\"\n\
         echo \"MARK big-udp $(net_probe udp-echo {peer}:7778 5 {big_udp})\"\n\
         echo \"MARK closed-port $(net_probe connect {peer}:7999 {timeout})\"\n"
    );
    if s.dns {
        init += "echo \"MARK nslookup-small $(nslookup small.example.test 192.168.127.1 2>&1 | tr '\\n' ' ')\"\n\
                 echo \"MARK nslookup-host $(nslookup host.boxlite.internal 192.168.127.1 2>&1 | tr '\\n' ' ')\"\n";
    }
    if s.usernet_extras {
        init += "echo \"MARK $(net_probe dns-tcp 192.168.127.1:53 many.example.test)\"\n\
                 echo \"MARK alias $(net_probe connect 192.168.127.254:18555)\"\n";
    }
    if s.gateway_refused {
        init += "echo \"MARK gateway $(net_probe connect 192.168.127.1:18555)\"\n";
    }
    // The forward under load goes to net_probe's server (busybox httpd's accept queue holds
    // only 9 connects); the runtime forward goes to a busybox httpd.
    init += "echo \"MARK $(net_probe httpd 80 /www)\"\nhttpd -p 81 -h /www\necho \"MARK ready\"\n";
    if s.flood {
        init += &format!(
            "nc -l -p 9000 </dev/null >/dev/null\n\
             echo \"MARK flood-start\"\n\
             echo \"MARK flood-tcp $(net_probe flood-tcp {peer}:7777 {FLOOD_TCP})\"\n\
             echo \"MARK flood-udp $(net_probe flood-udp {peer}:7778 {FLOOD_UDP})\"\n"
        );
    }
    init + vm::INIT_TAIL
}

/// Boots the guest on `config` and checks everything every backend must do. Returns the guest
/// (still running, printing its counters) for backend-specific checks.
fn boot_and_check_common(
    dir: &std::path::Path,
    config: &NetworkConfig,
    ns: &Netns,
    scenario: &Scenario,
    blob: &[u8],
) -> Guest {
    let init = init_script(&ns.peer, scenario);
    let initrd = vm::build_initramfs(
        dir,
        &init,
        &[("blob", blob.to_vec()), ("small", small_body())],
        &[],
    );
    let mut guest = Guest::boot(dir, &initrd, &config.qemu_args());

    let addr = guest.wait_for("MARK addr", BOOT);
    assert_eq!(
        addr,
        "MARK addr 192.168.127.2/24 mtu 1500",
        "our DHCP client's lease; console:\n{}",
        guest.console()
    );
    let route = guest.wait_for("MARK route", STEP);
    assert!(route.contains("default via 192.168.127.1"), "{route}");
    let udhcpc = guest.wait_for("UDHCPC", STEP);
    assert!(
        udhcpc.contains("ip=192.168.127.2 ") && udhcpc.contains("router=192.168.127.1"),
        "busybox udhcpc: {udhcpc}"
    );

    let wget = guest.wait_for("MARK wget", STEP);
    assert!(
        wget.contains(&sha256_hex(&vm::pattern(1_000_000, 3))),
        "HTTP download through NAT is byte-exact: {wget}"
    );
    let sent = guest.wait_for("MARK OK tcp-send", STEP);
    let expect = format!(
        "RECEIVED 3000000 {}",
        sha256_hex(&tcp_send_pattern(3_000_000))
    );
    assert!(
        sent.ends_with(&expect),
        "guest → peer TCP with half-close: {sent}"
    );
    let udp = guest.wait_for("MARK OK udp-echo", STEP);
    assert!(udp.contains("20 datagrams of 1000 bytes echoed"), "{udp}");
    let big = guest.wait_for("MARK big-udp", STEP);
    if scenario.big_udp {
        assert!(
            big.contains("OK udp-echo 5 datagrams of 8000 bytes echoed"),
            "UDP bigger than the MTU (fragments both ways): {big}"
        );
    }
    if scenario.relays_refusal {
        check_refused(&mut guest, "closed-port");
    }
    guest.wait_for("MARK ready", STEP);
    assert!(
        guest
            .lines
            .iter()
            .any(|l| l == "MARK OK httpd listening on 80"),
        "the guest's HTTP server on port 80; console:\n{}",
        guest.console()
    );
    guest
}

/// Sequential and concurrent GETs through a forward, each body compared byte for byte.
fn check_http(port: u16, blob: &[u8]) {
    let small = small_body();
    for _ in 0..1000 {
        assert_eq!(vm::http_get(port, "/small"), small, "sequential GET");
    }
    let all_connected = std::sync::Barrier::new(100);
    std::thread::scope(|s| {
        for _ in 0..100 {
            s.spawn(|| {
                let conn = vm::HttpConn::connect(port);
                all_connected.wait();
                assert_eq!(conn.get("/small"), small, "concurrent GET");
            });
        }
    });
    for _ in 0..3 {
        assert_eq!(vm::http_get(port, "/blob"), blob, "GET of the big blob");
    }
}

/// The guest's flood: [`FLOOD_TCP`] short TCP connections, then [`FLOOD_UDP`] one-datagram UDP
/// flows, all through usernet's NAT. Afterwards every connection and flow is gone and the
/// backend's descriptors and memory are back at their baseline.
///
/// How long that takes: a TCP connection leaves usernet the moment both sides have closed (the
/// guest closes first, so the TIME_WAIT is the guest kernel's and, toward the peer, the host
/// kernel's, never a descriptor of ours); a UDP flow leaves [`UDP_IDLE`] after its last datagram
/// (usernet looks every 500 ms). So the wait ends about [`UDP_IDLE`] after the flood.
fn check_flood_gives_back(guest: &mut Guest, net: &Usernet, trigger_port: u16) {
    std::thread::sleep(Duration::from_millis(500));
    let before = net.metrics();
    let (fds0, rss0) = (vm::open_fds(), vm::rss_kib());
    drop(TcpStream::connect(("127.0.0.1", trigger_port)).unwrap());
    guest.wait_for("MARK flood-start", STEP);
    // About 30 s here under TCG.
    let tcp = guest.wait_for("MARK flood-tcp", Duration::from_secs(300));
    assert!(
        tcp.ends_with(&format!(" {FLOOD_TCP}/{FLOOD_TCP} connections")),
        "{tcp}"
    );
    let udp = guest.wait_for("MARK flood-udp", STEP);
    assert!(
        udp.ends_with(&format!(" {FLOOD_UDP}/{FLOOD_UDP} flows")),
        "{udp}"
    );
    let peak = net.metrics();
    assert!(
        peak.tcp_connections_total.unwrap() - before.tcp_connections_total.unwrap()
            >= FLOOD_TCP as u64,
        "every flood connection went through usernet: {peak:?}"
    );

    let deadline = Instant::now() + UDP_IDLE + Duration::from_secs(8);
    loop {
        let m = net.metrics();
        let fds = vm::open_fds();
        if m.udp_flows == Some(0) && m.tcp_connections == Some(0) && fds <= fds0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resources not given back: fds {fds} (baseline {fds0}), {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss = vm::rss_kib();
    assert!(
        rss < rss0 + 8 * 1024,
        "memory back near baseline: {rss} KiB vs {rss0} KiB"
    );
}

/// Runtime add and remove of a forward to the guest's second httpd (port 81).
fn check_runtime_forward(add: impl Fn(PortForward) -> PortForward, remove: impl Fn(&PortForward)) {
    let f = add(PortForward::tcp(0, 81));
    assert_ne!(f.host_port, 0, "the chosen port is reported");
    assert_eq!(vm::http_get(f.host_port, "/blob").len(), 300_000);
    remove(&f);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(("127.0.0.1", f.host_port)).is_err(),
        "a removed forward no longer listens"
    );
}

/// Waits until the guest's counters stop moving, then compares them with the backend's.
fn check_counters(
    guest: &mut Guest,
    net_kind: NetworkKind,
    metrics: impl Fn() -> boxlite::net::NetworkMetrics,
) {
    let mut last = guest.next("STATS", STEP);
    for _ in 0..20 {
        let now = guest.next("STATS", STEP);
        if now == last {
            let m = metrics();
            let again = guest.next("STATS", STEP);
            if again == now {
                let v: Vec<u64> = now
                    .split_whitespace()
                    .skip(1)
                    .map(|x| x.parse().unwrap())
                    .collect();
                assert_eq!(
                    v[0], m.rx_bytes,
                    "guest rx bytes = backend rx bytes ({m:?})"
                );
                assert_eq!(
                    v[1], m.tx_bytes,
                    "guest tx bytes = backend tx bytes ({m:?})"
                );
                assert!(m.rx_packets > 0 && m.tx_packets > 0);
                if net_kind != NetworkKind::Usernet {
                    assert_eq!(
                        (m.tcp_connections, m.udp_flows, m.dns_queries),
                        (None, None, None),
                        "{net_kind} cannot see connections: unknown, not 0 ({m:?})"
                    );
                }
                return;
            }
        }
        last = now;
    }
    panic!("the guest's counters never settled");
}

fn blob() -> Vec<u8> {
    vm::pattern(300_000, 7)
}

/// What the many small GETs fetch: big enough to take several segments, small enough for a
/// thousand of them under TCG.
fn small_body() -> Vec<u8> {
    vm::pattern(48 * 1024, 11)
}

fn www_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let www = dir.join("peer-www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("blob"), vm::pattern(1_000_000, 3)).unwrap();
    www
}

#[test]
fn usernet_guest_dhcp_dns_nat_forwards_counters_and_flood() {
    let _lock = vm::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Netns::create();
    let www = www_dir(dir.path());
    ns.start_servers(&www);
    let (_case_dir, case) = run_case("23", &[]);
    let stub = StubDns::start(&case.join("zone.json"));

    let mut opts = NetworkOptions::new(NetworkKind::Usernet, dir.path());
    opts.dns = vec![stub.addr];
    opts.port_forwards = vec![PortForward::tcp(0, 80), PortForward::tcp(0, 9000)];
    let mut net = Usernet::new(opts);
    net.set_udp_idle_timeout(UDP_IDLE);
    let config = net.start().unwrap();
    let (http_port, trigger_port) = (
        config.port_forwards[0].host_port,
        config.port_forwards[1].host_port,
    );

    let scenario = Scenario {
        dns: true,
        usernet_extras: true,
        flood: true,
        eof_after_half_close: true,
        gateway_refused: true,
        relays_refusal: true,
        big_udp: true,
    };
    let blob = blob();
    let mut guest = boot_and_check_common(dir.path(), &config, &ns, &scenario, &blob);
    check_dns(&mut guest);

    let tcp_dns = guest.wait_for("MARK OK dns-tcp", STEP);
    assert!(
        tcp_dns.ends_with("answers=60 tc=0 answers=60 tc=0"),
        "DNS over TCP: all 60 records, two pipelined queries: {tcp_dns}"
    );
    check_refused(&mut guest, "alias");
    check_refused(&mut guest, "gateway");

    check_http(http_port, &blob);
    check_runtime_forward(
        |f| net.add_port_forward(f).unwrap(),
        |f| net.remove_port_forward(f).unwrap(),
    );
    let m = net.metrics();
    assert_eq!(
        m.dhcp_leases,
        Some(2),
        "our client and udhcpc each got a lease"
    );
    assert!(m.dns_queries >= Some(2), "{m:?}");
    assert!(m.tcp_connections_total >= Some(38), "{m:?}");

    check_flood_gives_back(&mut guest, &net, trigger_port);
    check_counters(&mut guest, NetworkKind::Usernet, || net.metrics());
    drop(guest);
    net.stop().unwrap();
}

#[test]
fn libslirp_guest_dhcp_nat_forwards_and_counters() {
    let _lock = vm::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Netns::create();
    ns.start_servers(&www_dir(dir.path()));
    let (_case_dir, case) = run_case("23", &[]);
    let stub = StubDns::start(&case.join("zone.json"));
    let mut opts = NetworkOptions::new(NetworkKind::Libslirp, dir.path());
    opts.port_forwards = vec![PortForward::tcp(0, 80)];
    opts.dns = vec![stub.addr];
    let (net, config) = NetworkHandle::start(opts).unwrap();
    let http_port = config.port_forwards[0].host_port;
    assert_ne!(http_port, 0);

    let blob = blob();
    let scenario = Scenario {
        dns: true,
        usernet_extras: false,
        flood: false,
        eof_after_half_close: true,
        gateway_refused: true,
        relays_refusal: true,
        big_udp: true,
    };
    let mut guest = boot_and_check_common(dir.path(), &config, &ns, &scenario, &blob);
    check_dns(&mut guest);
    check_refused(&mut guest, "gateway");
    check_http(http_port, &blob);
    check_runtime_forward(
        |f| net.add_port_forward(f).unwrap(),
        |f| net.remove_port_forward(f).unwrap(),
    );
    check_counters(&mut guest, NetworkKind::Libslirp, || net.metrics());
}

#[test]
fn passt_guest_dhcp_nat_forwards_and_counters() {
    let _lock = vm::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Netns::create();
    ns.start_servers(&www_dir(dir.path()));
    let mut opts = NetworkOptions::new(NetworkKind::Passt, dir.path());
    opts.port_forwards = vec![PortForward::tcp(0, 80)];
    let (net, config) = NetworkHandle::start(opts).unwrap();
    let http_port = config.port_forwards[0].host_port;

    let blob = blob();
    let scenario = Scenario {
        dns: false,
        usernet_extras: false,
        flood: false,
        eof_after_half_close: false,
        // passt's --no-map-gw leaves the gateway as an ordinary remote address: connects to it
        // are not refused, they go unanswered.
        gateway_refused: false,
        relays_refusal: false,
        big_udp: false,
    };
    let mut guest = boot_and_check_common(dir.path(), &config, &ns, &scenario, &blob);
    check_http(http_port, &blob);
    assert!(
        net.add_port_forward(PortForward::tcp(0, 81)).is_err(),
        "passt cannot add forwards at runtime, and says so"
    );
    check_counters(&mut guest, NetworkKind::Passt, || net.metrics());
}
