//! The guest agent in real QEMU guests (TCG): boot, Box assembly, exec sessions, shutdown and
//! persistence. Needs `scripts/build-assets.sh` to have run, plus qemu-system-x86_64, qemu-img,
//! qemu-io, virtiofsd, mke2fs and /bin/busybox on the host. Four boots in all (probe, the exec
//! Box, two boots of the disks Box), with the assertions grouped per boot.

mod support;

use std::time::{Duration, Instant};

use boxlite_protocol::{
    Control, ExecRequest, FileSpec, Frame, MountSource, MountSpec, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use support::{request, setup, Agent, Disk, Share, Vm};

const MINUTE: Duration = Duration::from_secs(60);

fn ready(reply: Control) {
    assert!(
        matches!(
            reply,
            Control::Ready {
                version: PROTOCOL_VERSION,
                ip: None
            }
        ),
        "expected Ready, got {reply:?}"
    );
}

fn exited(out: &support::Output, code: i32) {
    assert_eq!(
        (out.code, out.signal, &out.error),
        (Some(code), None, &None),
        "stdout {:?} stderr {:?}",
        out.stdout_text(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn probe_mode_prints_the_marker_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::launch(dir.path(), &[], "boxlite.probe=1");
    let status = vm.wait_exit(MINUTE);
    let took = vm.started.elapsed();
    assert!(status.success(), "QEMU exit status {status}");
    let console = vm.console_text();
    assert!(console.contains("BOXLITE-PROBE-OK"), "console:\n{console}");
    eprintln!("probe boot to power-off: {took:?}");
}

#[test]
fn exec_sessions_in_a_booted_box() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    support::qcow2(&disk, Some(&support::base_image()), "1G");
    // A volume that holds data but no filesystem: the agent must refuse to format it.
    let junk = dir.path().join("junk.qcow2");
    support::qcow2(&junk, None, "16M");
    let written = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 4096 4096"])
        .arg(&junk)
        .output()
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    let disks = [
        Disk {
            path: disk,
            serial: "root".into(),
        },
        Disk {
            path: junk,
            serial: "junk".into(),
        },
    ];
    let mut vm = Vm::launch(dir.path(), &disks, "");
    let agent = vm.connect();

    let early = agent.run(&["true"]);
    let message = early.error.expect("exec before Setup is an Error");
    assert!(message.contains("not set up"), "{message}");

    // A failed setup names what is missing and leaves the agent able to try again.
    let mut wrong = setup("box-a", true);
    wrong.root.serial = "nosuchdisk".into();
    match agent.setup(wrong) {
        Control::Error { message } => assert!(message.contains("nosuchdisk"), "{message}"),
        other => panic!("setup with a missing root disk answered {other:?}"),
    }
    let mut wrong = setup("box-a", true);
    wrong.mounts = vec![MountSpec {
        source: MountSource::Block {
            serial: "junk".into(),
            fstype: "ext4".into(),
            format_if_empty: true,
        },
        target: "/junk".into(),
        readonly: false,
        file: None,
    }];
    match agent.setup(wrong) {
        Control::Error { message } => assert!(
            message.contains("\"junk\"") && message.contains("not formatting"),
            "{message}"
        ),
        other => panic!("setup with a volume full of data answered {other:?}"),
    }
    ready(agent.setup(setup("box-a", true)));
    eprintln!("launch to Ready: {:?}", vm.started.elapsed());
    match agent.setup(setup("box-a", true)) {
        Control::Error { message } => assert!(message.contains("already set up"), "{message}"),
        other => panic!("a second Setup answered {other:?}"),
    }

    basic_exec(&agent);
    streams_and_stdin(&agent);
    terminals(&agent);
    signals_and_concurrency(&agent);
    users_cwd_env(&agent);
    bulk_output(&agent);
    box_environment(&agent);
}

fn basic_exec(agent: &Agent) {
    let out = agent.run(&["echo", "hello"]);
    exited(&out, 0);
    assert_eq!(out.stdout, b"hello\n");
    assert!(out.pid.is_some(), "Started came before Exited");

    exited(&agent.run(&["sh", "-c", "exit 7"]), 7);

    // A channel is free again as soon as its Exited arrived.
    for round in 0..3 {
        let out = agent
            .exec_on(1000, request(&["echo", "reused"]))
            .wait(MINUTE);
        exited(&out, 0);
        assert_eq!(out.stdout, b"reused\n", "round {round}");
    }

    let out = agent.run(&["no-such-command"]);
    let message = out.error.expect("a missing command is an Error");
    assert!(
        message.contains("no-such-command") && message.contains("not found"),
        "{message}"
    );
    let message = agent
        .run(&["/etc"])
        .error
        .expect("a directory is not executable");
    assert!(message.contains("permission denied"), "{message}");

    let mut req = request(&["id"]);
    req.user = "nosuchuser".into();
    let message = agent
        .exec(req)
        .wait(MINUTE)
        .error
        .expect("unknown user is an Error");
    assert!(message.contains("nosuchuser"), "{message}");
}

fn streams_and_stdin(agent: &Agent) {
    let out = agent.run(&["sh", "-c", "echo out; echo err >&2; echo out2"]);
    exited(&out, 0);
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");

    let mut req = request(&["cat"]);
    req.stdin = true;
    let cat = agent.exec(req);
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    cat.stdin(&input);
    cat.control(&Control::StdinEof);
    let out = cat.wait(MINUTE);
    exited(&out, 0);
    assert!(
        out.stdout == input,
        "cat echoed {} of {} bytes",
        out.stdout.len(),
        input.len()
    );

    let out = agent.run(&["sh", "-c", "cat; echo eof"]);
    exited(&out, 0);
    assert_eq!(out.stdout, b"eof\n", "stdin without streaming is /dev/null");
}

fn terminals(agent: &Agent) {
    let mut req = request(&["sh", "-c", "tty; stty size; read line; stty size"]);
    req.tty = true;
    req.stdin = true;
    req.rows = 33;
    req.cols = 101;
    let session = agent.exec(req);
    let before = session.read_until("33 101", MINUTE);
    assert!(before.contains("/dev/pts/"), "tty output: {before:?}");
    session.control(&Control::Resize {
        rows: 40,
        cols: 120,
    });
    session.stdin(b"go\n");
    let out = session.wait(MINUTE);
    exited(&out, 0);
    let after = out.stdout_text();
    assert!(after.contains("40 120"), "size after Resize: {after:?}");
    assert!(
        out.stderr.is_empty(),
        "a tty session has no separate stderr"
    );

    // End of stdin on a terminal is its EOF character: `cat` ends normally.
    let mut req = request(&["cat"]);
    req.tty = true;
    req.stdin = true;
    let cat = agent.exec(req);
    cat.stdin(b"typed\n");
    cat.read_until("typed\r\n", MINUTE);
    cat.control(&Control::StdinEof);
    exited(&cat.wait(MINUTE), 0);
}

fn signals_and_concurrency(agent: &Agent) {
    let sleeper = agent.exec(request(&["sleep", "100"]));
    sleeper.started();

    // A second session runs while the first one is busy.
    let mut req = request(&["sh", "-c", "read x; echo got $x"]);
    req.stdin = true;
    let reader = agent.exec(req);
    let quick = agent.run(&["echo", "second"]);
    exited(&quick, 0);
    assert_eq!(quick.stdout, b"second\n");
    reader.stdin(b"it\n");
    let out = reader.wait(MINUTE);
    exited(&out, 0);
    assert_eq!(out.stdout, b"got it\n");

    // A background child that keeps stdout open does not hold the session's end hostage.
    let asked = Instant::now();
    let out = agent.run(&["sh", "-c", "sleep 100 & echo started"]);
    exited(&out, 0);
    assert_eq!(out.stdout, b"started\n");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "took {:?}",
        asked.elapsed()
    );

    // A signal sent before the process has even started is delivered once it has.
    let early = agent.exec(request(&["sleep", "100"]));
    early.control(&Control::Signal { signal: 15 });
    let out = early.wait(MINUTE);
    assert_eq!((out.code, out.signal), (None, Some(15)), "{out:?}");

    // Many sessions at once, each with its own output.
    let sessions: Vec<_> = (0..12)
        .map(|i| {
            agent.exec(request(&[
                "sh",
                "-c",
                &format!("sleep 0.5; echo session {i}"),
            ]))
        })
        .collect();
    for (i, session) in sessions.iter().enumerate() {
        let out = session.wait(MINUTE);
        exited(&out, 0);
        assert_eq!(out.stdout_text(), format!("session {i}\n"));
    }

    let asked = Instant::now();
    sleeper.control(&Control::Signal { signal: 2 });
    let out = sleeper.wait(MINUTE);
    assert_eq!((out.code, out.signal), (None, Some(2)), "{out:?}");
    assert!(asked.elapsed() < Duration::from_secs(10));
}

fn users_cwd_env(agent: &Agent) {
    let mut req = request(&["id"]);
    req.user = "tester".into();
    let out = agent.exec(req).wait(MINUTE);
    exited(&out, 0);
    let id = out.stdout_text();
    assert!(id.contains("uid=1000(tester) gid=1000(tester)"), "{id}");
    assert!(id.contains("50(staff)"), "supplementary groups: {id}");

    let mut req = request(&["id", "-u"]);
    req.user = "1000:50".into();
    let out = agent.exec(req).wait(MINUTE);
    assert_eq!(out.stdout_text(), "1000\n");

    let mut req = request(&["sh", "-c", "pwd; env | sort"]);
    req.cwd = "/work/new/dir".into();
    req.env.push("FOO=bar baz".into());
    req.user = "tester".into();
    let out = agent.exec(req).wait(MINUTE);
    exited(&out, 0);
    assert_eq!(
        out.stdout_text(),
        "/work/new/dir\nFOO=bar baz\nHOME=/home/tester\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         PWD=/work/new/dir\nSHLVL=1\n",
        "the environment is exactly the request's plus HOME (PWD and SHLVL are the shell's)"
    );
}

fn bulk_output(agent: &Agent) {
    let pattern = support::pattern();
    let mut expected = Sha256::new();
    for _ in 0..50 {
        expected.update(&pattern);
    }
    let started = Instant::now();
    let out = agent
        .exec(request(&[
            "sh",
            "-c",
            "for i in $(seq 50); do cat /pattern; done",
        ]))
        .wait(Duration::from_secs(300));
    exited(&out, 0);
    assert_eq!(out.stdout.len(), 50 << 20);
    assert_eq!(
        hex::encode(Sha256::digest(&out.stdout)),
        hex::encode(expected.finalize()),
        "50 MiB of stdout arrive byte-exact"
    );
    eprintln!("50 MiB stdout in {:?}", started.elapsed());
}

fn box_environment(agent: &Agent) {
    let out = agent.run(&["hostname"]);
    assert_eq!(out.stdout_text(), "box-a\n");

    let out = agent.run(&["df", "-k", "/"]);
    let df = out.stdout_text();
    let total_kib: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df output: {df}"));
    assert!(total_kib > 900 * 1024, "grow_root filled the 1G disk: {df}");

    let out = agent.run(&["sh", "-c", "stat -c %a /tmp; mount"]);
    let text = out.stdout_text();
    assert!(text.starts_with("1777\n"), "{text}");
    for fs in [
        " /proc type proc",
        " /sys type sysfs",
        " /dev type devtmpfs",
        " /dev/pts type devpts",
        " /dev/shm type tmpfs",
        " /sys/fs/cgroup type cgroup2",
    ] {
        assert!(text.contains(fs), "missing{fs}: {text}");
    }
    // PID 1 reaps orphans: background children of a finished shell leave no zombies.
    exited(
        &agent.run(&["sh", "-c", "sleep 0.2 & sleep 0.3 & exit 0"]),
        0,
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = agent.run(&["sh", "-c", "cat /proc/[0-9]*/stat"]);
    let stat = out.stdout_text();
    let zombies: Vec<&str> = stat
        .lines()
        .filter(|l| {
            l.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    let mut req = request(&[
        "sh",
        "-c",
        "cat /dev/stdin; ls /dev/fd/ >/dev/null && echo fd",
    ]);
    req.stdin = true;
    let session = agent.exec(req);
    session.stdin(b"via /dev/stdin\n");
    session.control(&Control::StdinEof);
    let out = session.wait(MINUTE);
    assert_eq!(out.stdout_text(), "via /dev/stdin\nfd\n", "{out:?}");

    let out = agent.run(&["date", "+%s"]);
    let guest_time: u64 = out.stdout_text().trim().parse().unwrap();
    let host_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        guest_time.abs_diff(host_time) < 120,
        "guest clock {guest_time}, host clock {host_time}"
    );

    // The agent lives as long as the Box: sessions must not leak its descriptors or threads.
    let count_handles = || {
        let out = agent.run(&[
            "sh",
            "-c",
            "echo $(ls /proc/1/fd | wc -l) $(ls /proc/1/task | wc -l)",
        ]);
        out.stdout_text()
    };
    let before = count_handles();
    for tty in [false, true, false, true, false, true] {
        let mut req = request(&["cat"]);
        req.tty = tty;
        req.stdin = true;
        let session = agent.exec(req);
        session.stdin(b"x\n");
        session.control(&Control::StdinEof);
        exited(&session.wait(MINUTE), 0);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = count_handles();
    assert_eq!(
        before, after,
        "descriptors of PID 1 before and after six sessions"
    );

    let out = agent.run(&["cat", "/proc/1/cmdline"]);
    assert_eq!(out.stdout, b"/init\0", "the agent is PID 1");
}

#[test]
fn disks_survive_shutdown_and_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let volume = dir.path().join("volume.qcow2");
    support::qcow2(&disk, Some(&support::base_image()), "1G");
    support::qcow2(&volume, None, "256M");
    let disks = [
        Disk {
            path: disk.clone(),
            serial: "root".into(),
        },
        Disk {
            path: volume.clone(),
            serial: "volume-data-0123456789".into(),
        },
    ];
    // The volume's serial is longer than the 20 bytes virtio-blk carries: the guest sees it cut.
    let data_mount = MountSpec {
        source: MountSource::Block {
            serial: "volume-data-0123456789".into(),
            fstype: "ext4".into(),
            format_if_empty: true,
        },
        target: "/data".into(),
        readonly: false,
        file: None,
    };

    // A host directory shared through virtiofs, as a directory and as a single read-only file.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("settings.ini"), "from the host\n").unwrap();
    let share = Share {
        dir: shared.clone(),
        tag: "hostdir".into(),
    };
    let share_mounts = [
        MountSpec {
            source: MountSource::Virtiofs {
                tag: "hostdir".into(),
            },
            target: "/mnt/host".into(),
            readonly: false,
            file: None,
        },
        MountSpec {
            source: MountSource::Virtiofs {
                tag: "hostdir".into(),
            },
            target: "/etc/settings.ini".into(),
            readonly: true,
            file: Some("settings.ini".into()),
        },
    ];

    // First boot: the fresh volume is formatted; files are written to root, volume and share.
    let mut vm = Vm::launch_with_shares(dir.path(), &disks, &[share], "");
    let agent = vm.connect();
    let mut first = setup("box-b", false);
    first.mounts = vec![data_mount.clone()];
    first.mounts.extend(share_mounts);
    first.files = vec![FileSpec {
        path: "/etc/resolv.conf".into(),
        contents: "nameserver 192.168.127.1\n".into(),
        mode: 0o644,
    }];
    ready(agent.setup(first));
    let out = agent.run(&[
        "sh",
        "-c",
        "cat /etc/resolv.conf; echo kept > /root/persist.txt; echo cfg > /data/config.txt; \
         sleep 1000 & (trap '' TERM; sleep 1000) </dev/null >/dev/null 2>&1 & echo done",
    ]);
    exited(&out, 0);
    assert_eq!(out.stdout_text(), "nameserver 192.168.127.1\ndone\n");
    let out = agent.run(&[
        "sh",
        "-c",
        "cat /etc/settings.ini; echo guest > /mnt/host/from-guest.txt; \
         echo x > /etc/settings.ini || echo refused",
    ]);
    assert_eq!(out.stdout_text(), "from the host\nrefused\n", "{out:?}");
    assert_eq!(
        std::fs::read_to_string(shared.join("from-guest.txt")).unwrap(),
        "guest\n",
        "a write in the guest lands in the host directory"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("settings.ini")).unwrap(),
        "from the host\n"
    );
    let df = agent.run(&["df", "-k", "/"]).stdout_text();
    assert!(df.contains("/dev/vd"), "{df}");

    agent.control(0, &Control::Shutdown { grace_secs: None });
    let status = vm.wait_exit(MINUTE);
    assert!(
        status.success(),
        "QEMU exit status after Shutdown: {status}"
    );
    let console = vm.console_text();
    assert!(console.contains("power off"), "console:\n{console}");
    assert!(
        console.contains("killing them"),
        "a process ignoring SIGTERM was killed: {console}"
    );
    support::assert_qcow2_clean(&disk);
    support::assert_qcow2_clean(&volume);
    drop(vm);

    // Second boot on the same overlay: nothing is formatted again, the file share works.
    let mut vm = Vm::launch(dir.path(), &disks, "");
    let agent = vm.connect();
    let mut second = setup("box-b", false);
    second.mounts = vec![
        data_mount.clone(),
        MountSpec {
            source: data_mount.source.clone(),
            target: "/etc/app.conf".into(),
            readonly: true,
            file: Some("config.txt".into()),
        },
        // The same disk again, read-only, at a second place.
        MountSpec {
            source: data_mount.source.clone(),
            target: "/data-ro".into(),
            readonly: true,
            file: None,
        },
    ];
    ready(agent.setup(second));
    let dmesg = agent.run(&["dmesg"]).stdout_text();
    assert!(
        !dmesg.contains("recovery complete") && !dmesg.contains("not clean"),
        "the filesystems were unmounted cleanly at Shutdown: {dmesg}"
    );
    let out = agent.run(&[
        "sh",
        "-c",
        "cat /root/persist.txt /data/config.txt /etc/app.conf",
    ]);
    exited(&out, 0);
    assert_eq!(out.stdout_text(), "kept\ncfg\ncfg\n");
    let out = agent.run(&["sh", "-c", "echo x > /etc/app.conf"]);
    assert_ne!(out.code, Some(0), "a readonly file share refuses writes");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{out:?}"
    );
    let out = agent.run(&[
        "sh",
        "-c",
        "cat /data-ro/config.txt; touch /data-ro/x || echo refused",
    ]);
    assert_eq!(out.stdout_text(), "cfg\nrefused\n", "{out:?}");
    exited(&agent.run(&["touch", "/data/still-writable"]), 0);

    // The host side may disconnect, even in the middle of a frame, and come back; the agent drops
    // the partial frame and keeps serving.
    let mut partial = Vec::new();
    boxlite_protocol::write_frame(&mut partial, &Frame::control(77, &Control::StdinEof)).unwrap();
    agent.send_raw(&partial[..7]);
    std::thread::sleep(Duration::from_millis(300));
    drop(agent);
    std::thread::sleep(Duration::from_secs(1));
    let agent = vm.connect();
    let out = agent.run(&["echo", "again"]);
    exited(&out, 0);
    assert_eq!(
        out.stdout, b"again\n",
        "the agent serves a reconnected host"
    );

    // No PATH and no cwd in the request: docker's default PATH and `/` apply.
    let bare = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    let out = agent.exec(bare).wait(MINUTE);
    exited(&out, 0);

    // Shutdown while a session is streaming output: the session ends by SIGTERM, the VM powers off.
    let ticker = agent.exec(request(&[
        "sh",
        "-c",
        "while true; do echo tick; sleep 0.05; done",
    ]));
    ticker.read_until("tick\ntick\n", MINUTE);
    agent.control(0, &Control::Shutdown { grace_secs: None });
    let out = ticker.wait(MINUTE);
    assert_eq!((out.code, out.signal), (None, Some(15)), "{out:?}");
    assert!(vm.wait_exit(MINUTE).success());
    support::assert_qcow2_clean(&disk);
    support::assert_qcow2_clean(&volume);
}
