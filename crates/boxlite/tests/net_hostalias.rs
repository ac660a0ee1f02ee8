//! The host alias and DNS on the backends that do not own their stack (libslirp, passt), with
//! real guests: 192.168.127.254 reaches a server on the host's loopback only when host access is
//! allowed, and the resolver the guest is given (the gateway) answers, from the host's resolvers
//! (a stub on 127.0.0.53, named by the resolv.conf the backend reads) or from the `--dns`
//! override (a stub on another port).

mod net_common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use boxlite::net::{NetworkHandle, NetworkKind, NetworkOptions, Topology};
use net_common::vm::{self, Guest};
use net_common::{run_case, StubDns};

const BOOT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(60);

/// A server on 127.0.0.1 that reads to EOF and answers `HOSTLOOP`; counts its connections.
fn host_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::Relaxed);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            let _ = s.write_all(b"HOSTLOOP\n");
        }
    });
    (port, hits)
}

/// Boots a guest on `kind` and checks DNS through the gateway and the host alias.
fn check(kind: NetworkKind, allow_host: bool, dns_override: bool) {
    let _lock = vm::vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let (_case_dir, case) = run_case("23", &[]);
    // The host's resolver on a loopback address other than 127.0.0.1, as systemd-resolved's
    // 127.0.0.53 (passt 2023-03 could not reach those itself); the `--dns` override on a port
    // other than 53.
    let resolver = Ipv4Addr::new(127, 0, 0, 53);
    let stub = if dns_override {
        StubDns::start(&case.join("zone.json"))
    } else {
        StubDns::start_at(
            &case.join("zone.json"),
            SocketAddr::new(resolver.into(), 53),
        )
    };
    let resolv_conf = dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {resolver}\n")).unwrap();
    // The only test of this binary that reads it, and guest tests run one at a time.
    std::env::set_var("BOXLITE_RESOLV_CONF", &resolv_conf);
    let (port, hits) = host_server();

    let mut opts = NetworkOptions::new(kind, dir.path());
    opts.allow_host = allow_host;
    if dns_override {
        std::fs::write(&resolv_conf, "nameserver 127.0.0.9\n").unwrap();
        assert_ne!(stub.addr.port(), 53);
        opts.dns = vec![stub.addr];
    }
    let (net, config) = NetworkHandle::start(opts).unwrap();
    assert_eq!(config.dns, vec![Topology::GATEWAY], "the guest's resolver");

    let mut init = vm::INIT_HEAD.to_string();
    init += &format!(
        "echo nameserver {} > /etc/resolv.conf\n\
         echo \"MARK dns $(nslookup small.example.test 2>&1 | tr '\\n' ' ')\"\n\
         echo \"MARK alias $(timeout 8 net_probe tcp-send 192.168.127.254:{port} 10 line)\"\n\
         echo \"MARK gw $(timeout 8 net_probe tcp-send 192.168.127.1:{port} 10 line)\"\n\
         echo \"MARK done\"\n",
        config.dns[0]
    );
    init += vm::INIT_TAIL;
    let initrd = vm::build_initramfs(dir.path(), &init, &[], &[]);
    let mut guest = Guest::boot(dir.path(), &initrd, &config.qemu_args());
    let what = format!("{kind} allow_host={allow_host} dns_override={dns_override}");

    let dns = guest.wait_for("MARK dns", BOOT);
    assert!(
        dns.contains("198.51.100.200"),
        "{what}: the guest's resolver answers from the upstream: {dns}\nconsole:\n{}",
        guest.console()
    );
    let alias = guest.wait_for("MARK alias", STEP);
    if allow_host {
        assert!(
            alias.contains("OK tcp-send HOSTLOOP"),
            "{what}: the host alias reaches the host's loopback: {alias}"
        );
    } else {
        assert!(
            !alias.contains("HOSTLOOP"),
            "{what}: no host access without allow_host: {alias}"
        );
        assert_eq!(
            hits.load(Ordering::Relaxed),
            0,
            "{what}: nothing reached the host"
        );
    }
    let gateway = guest.wait_for("MARK gw", STEP);
    assert_eq!(
        gateway.contains("OK tcp-send HOSTLOOP"),
        allow_host,
        "{what}: the gateway leads to the host's loopback exactly with allow_host: {gateway}"
    );
    guest.wait_for("MARK done", STEP);
    drop(guest);
    net.stop().unwrap();
}

#[test]
fn libslirp_host_alias_and_dns() {
    check(NetworkKind::Libslirp, true, false);
    check(NetworkKind::Libslirp, false, true);
}

#[test]
fn passt_host_alias_and_dns() {
    check(NetworkKind::Passt, true, false);
    check(NetworkKind::Passt, false, true);
}
