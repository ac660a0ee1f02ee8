//! virtiofsd for host folder shares: it starts, its socket appears, QEMU accepts the arguments
//! we give it and completes the vhost-user handshake, and the daemon goes away with QEMU.
//! Needs virtiofsd (scripts/setup-virtiofsd.sh) and qemu-system-x86_64.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boxlite::volumes::virtiofs::{
    self, memory_backend_args, plan_share, ShareOptions, Transport, VirtiofsError, Virtiofsd,
};

fn wait_exit(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        // Reaped by its Child owner or gone: /proc entry disappears or turns zombie.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.is_empty() || status.contains("State:\tZ") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn virtiofsd_starts_and_qemu_connects() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "hi\n").unwrap();
    let socket = dir.path().join("fs0.sock");
    let log = dir.path().join("virtiofsd.log");

    let plan = plan_share(&shared, true, &dir.path().join("staging")).unwrap();
    assert_eq!(plan.shared_dir, shared);
    let mut options = ShareOptions::new("share0", &socket);
    options.log_path = Some(log.clone());
    let mut daemon = Virtiofsd::spawn(&plan, &options).unwrap();
    assert!(daemon.is_running());
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemon.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--readonly"), "{cmdline}");
    assert!(cmdline.contains("--tag share0"), "{cmdline}");

    let mut args = vec![
        "-machine".to_string(),
        "q35,accel=tcg".to_string(),
        "-m".to_string(),
        "128".to_string(),
        "-nodefaults".to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-S".to_string(),
    ];
    args.extend(memory_backend_args(128, true));
    args.extend(daemon.qemu_args(0, Transport::Pci));
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // QEMU connects while realizing the device (vhost-user handshake), before the guest runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            let mut err = String::new();
            qemu.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("qemu exited ({status}) with our arguments {args:?}: {err}");
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Client connected") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU never connected; virtiofsd log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        qemu.try_wait().unwrap().is_none(),
        "QEMU accepted the device"
    );
    assert!(daemon.is_running(), "virtiofsd serves the connected QEMU");

    // One daemon per VM: when QEMU goes away, virtiofsd exits by itself.
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    let pid = daemon.pid();
    assert!(
        wait_exit(pid, Duration::from_secs(10)),
        "virtiofsd outlived QEMU"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("Client disconnected"));
    daemon.stop();
    assert!(!socket.exists(), "socket cleaned up");
}

#[test]
fn single_files_are_shared_alone() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("config.toml"), "a = 1\n").unwrap();
    std::fs::write(host.join("sibling-secret"), "no\n").unwrap();
    let staging = dir.path().join("box/shares/0");

    let plan = plan_share(&host.join("config.toml"), false, &staging).unwrap();
    assert_eq!(plan.shared_dir, staging);
    assert_eq!(plan.file.as_deref(), Some("config.toml"));
    assert!(!plan.readonly);
    let names: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["config.toml"], "siblings stay out of the share");
    let a = std::fs::metadata(host.join("config.toml")).unwrap();
    let b = std::fs::metadata(staging.join("config.toml")).unwrap();
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "same file, writes visible both ways"
    );

    // Planning again (a restart) replaces the link; a symlink to the file shares the file.
    let link = dir.path().join("link-to-config");
    std::os::unix::fs::symlink(host.join("config.toml"), &link).unwrap();
    let again = plan_share(&link, false, &staging).unwrap();
    assert_eq!(again.file.as_deref(), Some("config.toml"));
    let c = std::fs::symlink_metadata(staging.join("config.toml")).unwrap();
    assert!(c.is_file() && c.ino() == a.ino());

    let socket = dir.path().join("f.sock");
    let daemon = Virtiofsd::spawn(&plan, &ShareOptions::new("file0", &socket)).unwrap();
    assert!(socket.exists());
    daemon.stop();
}

#[test]
fn bad_shares_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    assert!(matches!(
        plan_share(&dir.path().join("missing"), true, &staging),
        Err(VirtiofsError::BadSource { .. })
    ));
    assert!(matches!(
        plan_share(std::path::Path::new("/dev/null"), true, &staging),
        Err(VirtiofsError::BadSource { .. })
    ));

    let plan = plan_share(dir.path(), false, &staging).unwrap();
    let long = dir.path().join("x".repeat(120));
    assert!(matches!(
        Virtiofsd::spawn(&plan, &ShareOptions::new("t", &long)),
        Err(VirtiofsError::SocketPathTooLong { .. })
    ));
    assert!(matches!(
        Virtiofsd::spawn(&plan, &ShareOptions::new("bad,tag", &dir.path().join("s"))),
        Err(VirtiofsError::BadTag { .. })
    ));

    // A shared folder that vanished: virtiofsd exits and we say why, promptly.
    let gone = virtiofs::SharePlan {
        shared_dir: dir.path().join("vanished"),
        file: None,
        readonly: true,
    };
    let mut options = ShareOptions::new("t", &dir.path().join("s.sock"));
    options.log_path = Some(dir.path().join("log"));
    let started = Instant::now();
    let err = Virtiofsd::spawn(&gone, &options).unwrap_err();
    assert!(matches!(err, VirtiofsError::Start { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
