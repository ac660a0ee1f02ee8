//! Test support: boots the real guest (kernel + initramfs from `target/assets`) under QEMU with the
//! device layout the boxlite VMM uses, and speaks the agent protocol to it over the virtio-serial
//! socket. Nothing is mocked; a missing asset fails the test with the command that builds it.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use boxlite_protocol::{
    read_frame, write_frame, BlockDevice, Control, ExecRequest, Frame, GuestSetup, Tag,
};
use sha2::{Digest, Sha256};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kernel and initramfs built by `scripts/build-assets.sh`.
#[derive(Debug, Clone)]
pub struct Assets {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// The boot assets; panics with instructions when they are missing.
pub fn assets() -> Assets {
    let dir = std::env::var_os("BOXLITE_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/assets"));
    let assets = Assets {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.img"),
    };
    for file in [&assets.vmlinux, &assets.initramfs] {
        assert!(
            file.is_file(),
            "{} is missing: run `scripts/build-assets.sh` before the guest tests",
            file.display()
        );
    }
    // Testing an old agent would prove nothing about the current sources.
    let built = fs::metadata(&assets.initramfs)
        .and_then(|m| m.modified())
        .unwrap();
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in fs::read_dir(&sources).unwrap().flatten() {
        let changed = entry.metadata().and_then(|m| m.modified()).unwrap();
        assert!(
            changed <= built,
            "{} is older than {}: run `scripts/build-assets.sh` again",
            assets.initramfs.display(),
            entry.path().display()
        );
    }
    assets
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 1 MiB of deterministic bytes (a xorshift sequence), stored as /pattern in the test rootfs.
pub fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw ext4 image (64 MiB) of the busybox rootfs plus /pattern, shared by every test and
/// kept in cargo's test scratch directory under a name derived from its inputs, so that it is
/// built once and rebuilt when the rootfs script or the host's busybox changes.
pub fn base_image() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let busybox = fs::read("/bin/busybox").unwrap_or_default();
        assert!(
            !busybox.is_empty(),
            "/bin/busybox on this host is missing or empty (something truncated it?): \
             apt-get install --reinstall busybox-static"
        );
        let script = repo_root().join("scripts/make-busybox-rootfs.sh");
        let mut key = Sha256::new();
        key.update(fs::read(&script).expect("scripts/make-busybox-rootfs.sh"));
        key.update(&busybox);
        key.update(pattern());
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let raw = scratch.join(format!(
            "guest-base-{}.raw",
            &hex::encode(key.finalize())[..16]
        ));
        if raw.is_file() {
            return raw;
        }

        let work = tempfile::Builder::new()
            .prefix("guest-base")
            .tempdir_in(&scratch)
            .expect("temp dir");
        let tree = work.path().join("tree");
        run(Command::new("bash").arg(&script).arg(&tree));
        fs::write(tree.join("pattern"), pattern()).unwrap();
        let staged = work.path().join("base.raw");
        run(Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&tree)
            .arg(&staged)
            .arg("64M"));
        // Another test process may have won the race; either copy is the same image.
        fs::rename(&staged, &raw).expect("moving the base image into place");
        raw
    })
    .clone()
}

/// A qcow2 overlay of `backing` (raw), or a fresh empty qcow2 when `backing` is None.
pub fn qcow2(path: &Path, backing: Option<&Path>, size: &str) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(backing) = backing {
        cmd.args(["-F", "raw", "-b"]).arg(backing);
    }
    run(cmd.arg(path).arg(size));
}

/// `qemu-img check` output, asserting it is clean.
pub fn assert_qcow2_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One disk attached to the VM.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub serial: String,
}

/// A host directory shared with the guest through virtiofsd.
#[derive(Debug, Clone)]
pub struct Share {
    pub dir: PathBuf,
    pub tag: String,
}

/// Starts virtiofsd for `share`; its socket is `socket`.
fn start_virtiofsd(share: &Share, socket: &Path) -> Child {
    let _ = fs::remove_file(socket);
    let child = Command::new("virtiofsd")
        .arg("--shared-dir")
        .arg(&share.dir)
        .arg("--socket-path")
        .arg(socket)
        .args(["--cache", "never", "--sandbox", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("virtiofsd (cargo install virtiofsd; needs libseccomp-dev libcap-ng-dev)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd made no socket at {}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    child
}

/// A running QEMU.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    virtiofsd: Vec<Child>,
    pub console: PathBuf,
    pub socket: PathBuf,
    pub started: Instant,
}

impl Vm {
    /// Boots the guest with `disks` (the first is the root) in `dir`; `extra_append` goes on the
    /// kernel command line.
    pub fn launch(dir: &Path, disks: &[Disk], extra_append: &str) -> Vm {
        Vm::launch_with_shares(dir, disks, &[], extra_append)
    }

    /// Like [`Vm::launch`], plus virtiofs shares (guest memory is then a shared memfd, as
    /// vhost-user needs).
    pub fn launch_with_shares(
        dir: &Path,
        disks: &[Disk],
        shares: &[Share],
        extra_append: &str,
    ) -> Vm {
        let assets = assets();
        let console = dir.join("console.log");
        let socket = dir.join("agent.sock");
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-no-user-config", "-nographic"])
            .args([
                "-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256",
            ])
            .arg("-kernel")
            .arg(&assets.vmlinux)
            .arg("-initrd")
            .arg(&assets.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet tsc_early_khz=2300000 {extra_append}"
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-serial-pci,id=vser"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                socket.display()
            ))
            .args([
                "-device",
                "virtserialport,bus=vser.0,chardev=agent,name=boxlite.agent",
            ]);
        for (i, disk) in disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=disk{i},format=qcow2",
                    disk.path.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive=disk{i},serial={}",
                    disk.serial
                ));
        }
        let mut virtiofsd = Vec::new();
        if !shares.is_empty() {
            cmd.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
                .args(["-numa", "node,memdev=mem"]);
        }
        for (i, share) in shares.iter().enumerate() {
            let socket = dir.join(format!("fs{i}.sock"));
            virtiofsd.push(start_virtiofsd(share, &socket));
            cmd.arg("-chardev")
                .arg(format!("socket,id=fs{i},path={}", socket.display()))
                .arg("-device")
                .arg(format!("vhost-user-fs-pci,chardev=fs{i},tag={}", share.tag));
        }
        cmd.arg("-no-reboot")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd
            .spawn()
            .expect("qemu-system-x86_64 (install QEMU, see setup-host.sh)");
        Vm {
            child,
            virtiofsd,
            console,
            socket,
            started,
        }
    }

    /// The console log so far.
    pub fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Connects to the agent port.
    pub fn connect(&mut self) -> Agent {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                return Agent::new(stream, self.console.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before the agent socket opened: {}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no agent socket at {}",
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "QEMU did not exit within {timeout:?}; console:\n{}",
                    self.console_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.virtiofsd.iter_mut()) {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

type Inbox = Arc<(Mutex<(HashMap<u32, VecDeque<Frame>>, bool)>, Condvar)>;

/// The host's end of the agent protocol.
#[derive(Debug)]
pub struct Agent {
    writer: Mutex<UnixStream>,
    inbox: Inbox,
    next_channel: AtomicU32,
    console: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The reader thread holds a clone of the socket: shut it down to really disconnect.
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
}

/// What one exec session produced.
#[derive(Debug, Default)]
pub struct Output {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A running session on one channel.
#[derive(Debug)]
pub struct Session<'a> {
    agent: &'a Agent,
    pub channel: u32,
}

impl Agent {
    fn new(stream: UnixStream, console: PathBuf) -> Agent {
        let inbox: Inbox = Arc::default();
        let reader = stream.try_clone().unwrap();
        let shared = Arc::clone(&inbox);
        thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 20, reader);
            loop {
                let frame = read_frame(&mut reader);
                let (lock, cond) = &*shared;
                let mut inbox = lock.lock().unwrap();
                match frame {
                    Ok(Some(frame)) => inbox.0.entry(frame.channel).or_default().push_back(frame),
                    _ => {
                        inbox.1 = true;
                        cond.notify_all();
                        return;
                    }
                }
                cond.notify_all();
            }
        });
        Agent {
            writer: Mutex::new(stream),
            inbox,
            next_channel: AtomicU32::new(1),
            console,
        }
    }

    pub fn send(&self, frame: &Frame) {
        write_frame(&mut *self.writer.lock().unwrap(), frame).expect("writing to the agent");
    }

    /// Writes raw bytes (e.g. part of a frame) to the agent.
    pub fn send_raw(&self, bytes: &[u8]) {
        io::Write::write_all(&mut *self.writer.lock().unwrap(), bytes).expect("writing raw");
    }

    pub fn control(&self, channel: u32, msg: &Control) {
        self.send(&Frame::control(channel, msg));
    }

    /// The next frame on `channel`; panics (with the console log) after `timeout`.
    pub fn recv(&self, channel: u32, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.inbox;
        let mut inbox = lock.lock().unwrap();
        loop {
            if let Some(frame) = inbox.0.get_mut(&channel).and_then(VecDeque::pop_front) {
                return frame;
            }
            let now = Instant::now();
            if inbox.1 || now >= deadline {
                let why = if inbox.1 {
                    "the agent socket closed"
                } else {
                    "timed out"
                };
                drop(inbox);
                panic!(
                    "{why} waiting for a frame on channel {channel}; console:\n{}",
                    fs::read_to_string(&self.console).unwrap_or_default()
                );
            }
            inbox = cond.wait_timeout(inbox, deadline - now).unwrap().0;
        }
    }

    /// The next control message on `channel`.
    pub fn recv_control(&self, channel: u32, timeout: Duration) -> Control {
        let frame = self.recv(channel, timeout);
        frame
            .parse_control()
            .unwrap_or_else(|e| panic!("{e}: {frame:?}"))
    }

    /// Sends Setup and returns the reply (Ready or Error).
    pub fn setup(&self, setup: GuestSetup) -> Control {
        self.control(0, &Control::Setup(Box::new(setup)));
        self.recv_control(0, Duration::from_secs(180))
    }

    /// Starts a session on a fresh channel.
    pub fn exec(&self, req: ExecRequest) -> Session<'_> {
        let channel = self.next_channel.fetch_add(1, Ordering::SeqCst);
        self.exec_on(channel, req)
    }

    /// Starts a session on `channel`.
    pub fn exec_on(&self, channel: u32, req: ExecRequest) -> Session<'_> {
        self.control(channel, &Control::Exec(Box::new(req)));
        Session {
            agent: self,
            channel,
        }
    }

    /// Runs `argv` (no stdin, no tty, a plain PATH) and collects its output.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.exec(request(argv)).wait(Duration::from_secs(60))
    }
}

/// An exec request with a usual PATH and nothing else.
pub fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd: "/".into(),
        ..ExecRequest::default()
    }
}

impl Session<'_> {
    pub fn stdin(&self, bytes: &[u8]) {
        for chunk in bytes.chunks(boxlite_protocol::MAX_BODY) {
            self.agent
                .send(&Frame::data(self.channel, Tag::Stdin, chunk.to_vec()));
        }
    }

    pub fn control(&self, msg: &Control) {
        self.agent.control(self.channel, msg);
    }

    /// Waits for `Started` and returns the pid (panics on anything else).
    pub fn started(&self) -> u32 {
        match self
            .agent
            .recv_control(self.channel, Duration::from_secs(30))
        {
            Control::Started { pid } => pid,
            other => panic!(
                "expected Started on channel {}, got {other:?}",
                self.channel
            ),
        }
    }

    /// Reads stdout until it contains `needle`; returns what was read.
    pub fn read_until(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.agent.recv(self.channel, left);
            match frame.tag {
                Tag::Stdout => seen.extend_from_slice(&frame.body),
                Tag::Control => match frame.parse_control().unwrap() {
                    Control::Started { .. } => {}
                    other => panic!("waiting for {needle:?} in {seen:?}, got {other:?}"),
                },
                _ => {}
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Collects output until `Exited` or `Error`.
    pub fn wait(&self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut out = Output::default();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.agent.recv(self.channel, left);
            match frame.tag {
                Tag::Stdout => out.stdout.extend_from_slice(&frame.body),
                Tag::Stderr => out.stderr.extend_from_slice(&frame.body),
                Tag::Stdin => panic!("the agent sent a stdin frame"),
                Tag::Control => match frame.parse_control().unwrap() {
                    Control::Started { pid } => out.pid = Some(pid),
                    Control::Exited { code, signal } => {
                        out.code = code;
                        out.signal = signal;
                        return out;
                    }
                    Control::Error { message } => {
                        out.error = Some(message);
                        return out;
                    }
                    other => panic!("unexpected {other:?} on channel {}", self.channel),
                },
            }
        }
    }
}

/// A GuestSetup for a root disk with serial "root".
pub fn setup(hostname: &str, grow_root: bool) -> GuestSetup {
    GuestSetup {
        hostname: hostname.into(),
        root: BlockDevice {
            serial: "root".into(),
            fstype: "ext4".into(),
        },
        grow_root,
        ..GuestSetup::default()
    }
}
