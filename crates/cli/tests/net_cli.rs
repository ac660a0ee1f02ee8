//! Network options through the CLI: what is refused before anything is made, what the errors
//! say, port forwards that outlive a stop, backend helpers that do not outlive their Box, and
//! the counters a backend cannot know.

mod support;

use std::time::{Duration, Instant};

use support::{processes_mentioning, Env};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn network_none_refuses_published_ports() {
    let env = Env::new();
    let img = env.busybox();

    let out = env.run(&[
        "create",
        "--name",
        "np",
        "--network",
        "none",
        "-p",
        "0:80",
        img,
    ]);
    assert!(!out.status.success(), "-p with --network none is refused");
    let err = stderr(&out);
    assert!(
        err.contains("--network none") && err.contains("-p/--publish"),
        "the error names both options: {err}"
    );
    assert!(env.ls().is_empty(), "nothing was created: {:?}", env.ls());

    env.ok(&["create", "--name", "quiet", "--network", "none", img]);
    let out = env.run(&["port", "add", "quiet", "0:80"]);
    assert!(!out.status.success(), "port add on a Box without network");
    assert!(stderr(&out).contains("--network none"), "{}", stderr(&out));
    assert_eq!(env.ok(&["port", "ls", "quiet"]), "", "nothing recorded");
}

#[test]
fn a_forward_that_cannot_bind_says_why() {
    let env = Env::new();
    let img = env.busybox();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();

    for network in ["usernet", "libslirp"] {
        let spec = format!("127.0.0.1:{port}:80");
        let out = env.run(&[
            "run",
            "--rm",
            "--network",
            network,
            "-p",
            &spec,
            img,
            "true",
        ]);
        assert!(!out.status.success(), "{network}: the port is taken");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cannot bind port forward 127.0.0.1:{port}:80/tcp"))
                && err.contains("in use"),
            "{network}: the OS's reason is in the message: {err}"
        );
    }
}

#[test]
fn ports_added_at_runtime_persist_and_a_bare_host_port_removes_them() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&[
        "run", "-d", "--name", "web", "-p", "0:81", img, "sleep", "1000",
    ]);

    let added = env.ok(&["port", "add", "web", "0:80"]);
    let host_port: u16 = added
        .trim()
        .rsplit_once(':')
        .and_then(|(left, _)| left.rsplit_once(':'))
        .map(|(_, p)| p.parse().unwrap())
        .unwrap_or_else(|| panic!("forward in effect: {added}"));
    let spec = format!("127.0.0.1:{host_port}:80/tcp");
    assert!(env
        .ok(&["port", "ls", "web"])
        .contains(&format!("127.0.0.1:{host_port}:80/tcp")));

    env.ok(&["stop", "web"]);
    let stored = env.ok(&["port", "ls", "web", "--json"]);
    let stored: Vec<serde_json::Value> = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        stored.len(),
        2,
        "the -p forward and the added one: {stored:?}"
    );
    assert!(
        stored
            .iter()
            .any(|p| p["host_port"] == host_port && p["guest_port"] == 80),
        "the runtime forward is in the Box's config: {stored:?}"
    );

    let out = env.run(&["port", "rm", "web", "1"]);
    assert!(!out.status.success(), "no forward on host port 1");
    env.ok(&["port", "rm", "web", &host_port.to_string()]);
    let left = env.ok(&["port", "ls", "web"]);
    assert!(!left.contains(&spec), "removed for good: {left}");
    assert!(left.contains(":81/tcp"), "the other forward stays: {left}");
}

/// Waits up to 10 s for no process to mention `needle`; returns the ones left.
fn gone(needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn passt_ends_with_its_box_however_the_box_ends() {
    let env = Env::new();
    let img = env.busybox();

    let id = env.ok(&[
        "run",
        "-d",
        "--name",
        "p1",
        "--network",
        "passt",
        img,
        "sleep",
        "1000",
    ]);
    let dir = env.boxes_dir().join(id.trim());
    let needle = format!("{}/", dir.display());
    assert!(
        processes_mentioning("passt")
            .iter()
            .any(|p| p.contains(&needle)),
        "passt runs for the Box: {:?}",
        processes_mentioning("passt")
    );

    let stats = env.ok(&["stats", "p1", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["network"]["tx_packets"].as_u64() > Some(0), "{stats}");
    for unknown in ["tcp_connections", "udp_flows", "dns_queries"] {
        assert!(
            stats["network"][unknown].is_null(),
            "passt cannot count {unknown}: unknown, not 0: {stats}"
        );
    }
    let table = env.ok(&["stats", "p1"]);
    let line = table
        .lines()
        .find(|l| l.contains("tcp_connections "))
        .unwrap();
    assert!(line.trim_end().ends_with(" -"), "shown as unknown: {table}");

    // The shim killed outright: its passt goes with it.
    let shim = env.state_of("p1")["shim_pid"].as_i64().unwrap();
    // SAFETY: plain kill(2) of the shim this test started.
    unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    let left = gone(&needle);
    assert!(left.is_empty(), "passt outlived a killed shim: {left:?}");

    // rm -f of a running Box.
    let id = env.ok(&[
        "run",
        "-d",
        "--name",
        "p2",
        "--network",
        "passt",
        img,
        "sleep",
        "1000",
    ]);
    let needle = format!("{}/", env.boxes_dir().join(id.trim()).display());
    env.ok(&["rm", "-f", "p2"]);
    let left = gone(&needle);
    assert!(left.is_empty(), "passt outlived rm -f: {left:?}");
}
