//! Real-guest plumbing for the network tests: a tiny initramfs (busybox, the virtio-net modules,
//! the `net_probe` test aid and a scenario `/init`), QEMU under TCG attached to a backend's
//! socket, and a throwaway network namespace acting as "the internet" (servers on a veth peer,
//! so the traffic never leaves this machine).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Guest tests share the two CPUs and measure process-wide fds: one at a time.
static VM_LOCK: Mutex<()> = Mutex::new(());

pub fn vm_lock() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn kernel_dir() -> PathBuf {
    let d = repo_root().join("assets/kernel");
    assert!(
        d.join("vmlinux").exists(),
        "no guest kernel in {}: run `bash scripts/fetch-kernel.sh`",
        d.display()
    );
    d
}

/// Builds (once per test binary) the static `net_probe` test aid and returns its path.
pub fn net_probe() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "boxlite-guest",
            "--example",
            "net_probe",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo_root())
        .status()
        .expect("cargo runs");
    assert!(st.success(), "building net_probe failed");
    let p = target.join("x86_64-unknown-linux-gnu/debug/examples/net_probe");
    *built = Some(p.clone());
    p
}

/// A network namespace with a veth pair: the host side is 10.200.N.1, the namespace 10.200.N.2.
pub struct Netns {
    pub name: String,
    pub peer: String,
    servers: Option<Child>,
}

impl Netns {
    pub fn create() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() % 50) * 5 + NEXT.fetch_add(1, Ordering::Relaxed) % 5 + 1;
        let name = format!("blnet{n}");
        let (host_if, ns_if) = (format!("blh{n}"), format!("bln{n}"));
        let sh = |cmd: &str| {
            let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
            assert!(
                st.success(),
                "`{cmd}` failed (the guest tests need root and iproute2)"
            );
        };
        for args in [vec!["netns", "del", &name], vec!["link", "del", &host_if]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
        sh(&format!("ip netns add {name}"));
        sh(&format!(
            "ip link add {host_if} type veth peer name {ns_if}"
        ));
        sh(&format!("ip link set {ns_if} netns {name}"));
        sh(&format!(
            "ip addr add 10.200.{n}.1/24 dev {host_if} && ip link set {host_if} up"
        ));
        sh(&format!(
            "ip netns exec {name} sh -c 'ip addr add 10.200.{n}.2/24 dev {ns_if} && \
             ip link set {ns_if} up && ip link set lo up'"
        ));
        Netns {
            name,
            peer: format!("10.200.{n}.2"),
            servers: None,
        }
    }

    /// Starts the servers inside the namespace: TCP 7777 (reads to EOF, answers
    /// `RECEIVED <bytes> <sha256>`), UDP 7778 (echo), HTTP 8080 serving `www`.
    pub fn start_servers(&mut self, www: &Path) {
        let script = r#"
import hashlib, http.server, os, socket, socketserver, sys, threading
os.chdir(sys.argv[1])
class Sum(socketserver.BaseRequestHandler):
    def handle(self):
        h = hashlib.sha256(); n = 0
        while True:
            d = self.request.recv(65536)
            if not d: break
            h.update(d); n += len(d)
        self.request.sendall(("RECEIVED %d %s\n" % (n, h.hexdigest())).encode())
class T(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 7778))
    while True:
        d, a = s.recvfrom(65535); s.sendto(d, a)
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=T(("0.0.0.0", 7777), Sum).serve_forever, daemon=True).start()
print("servers up", flush=True)
T(("0.0.0.0", 8080), H).serve_forever()
"#;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", script])
            .arg(www)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 11];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        assert_eq!(&line, b"servers up\n");
        self.servers = Some(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.servers.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deterministic content of `len` bytes (what the guest serves and the tests expect).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed)) % 253) as u8)
        .collect()
}

/// Writes an initramfs holding busybox, the virtio-net modules, net_probe, the `www` files,
/// the host programs `programs` (at their host paths, with the libraries `ldd` names) and
/// `init` as /init; returns its path.
pub fn build_initramfs(
    dir: &Path,
    init: &str,
    www: &[(&str, Vec<u8>)],
    programs: &[&Path],
) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "bin",
        "lib/modules",
        "www",
        "proc",
        "sys",
        "dev",
        "tmp",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    std::fs::copy(net_probe(), root.join("bin/net_probe")).unwrap();
    let kdir = kernel_dir();
    let version = std::fs::read_to_string(kdir.join("VERSION")).unwrap();
    let mods = kdir.join("modules/lib/modules").join(version.trim());
    for m in [
        "drivers/virtio/virtio_ring.ko",
        "drivers/virtio/virtio.ko",
        "drivers/virtio/virtio_pci_modern_dev.ko",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
        "drivers/virtio/virtio_pci.ko",
        "net/core/failover.ko",
        "drivers/net/net_failover.ko",
        "drivers/net/virtio_net.ko",
    ] {
        let src = mods.join("kernel").join(m);
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(&src, root.join("lib/modules").join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
    for (name, data) in www {
        std::fs::write(root.join("www").join(name), data).unwrap();
    }
    std::fs::write(
        root.join("udhcpc.sh"),
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\n\
         echo \"UDHCPC ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu\"\n",
    )
    .unwrap();
    for program in programs {
        copy_with_libraries(program, &root);
    }
    std::fs::write(root.join("init"), init).unwrap();
    for f in ["init", "udhcpc.sh"] {
        Command::new("chmod")
            .args(["755", root.join(f).to_str().unwrap()])
            .status()
            .unwrap();
    }
    let out = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    out
}

/// The common head of every scenario: modules, lo, our DHCP client, then busybox udhcpc.
pub const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko || echo "MARK insmod $m failed"
done
ip link set lo up
net_probe dhcp 52:54:00:12:34:56 30
echo "MARK addr $(ip -4 -o addr show dev eth0 | awk '{print $4}') mtu $(cat /sys/class/net/eth0/mtu)"
echo "MARK route $(ip route | grep default)"
udhcpc -i eth0 -n -q -f -s /udhcpc.sh -t 5
"#;

/// The tail: print the NIC's counters every second until killed.
pub const INIT_TAIL: &str = r#"
while true; do
  echo "STATS $(cat /sys/class/net/eth0/statistics/rx_bytes) $(cat /sys/class/net/eth0/statistics/tx_bytes)"
  sleep 1
done
"#;

/// A running guest with its serial console in a file.
pub struct Guest {
    child: Child,
    pub log: PathBuf,
    read_pos: usize,
    pub lines: Vec<String>,
}

impl Guest {
    pub fn boot(dir: &Path, initrd: &Path, qemu_net_args: &[String]) -> Guest {
        let log = dir.join("console.log");
        let kernel = kernel_dir().join("vmlinux");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "q35",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "256",
                "-nodefaults",
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet tsc_early_khz=2300000",
            ])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .args(qemu_net_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 runs");
        Guest {
            child,
            log,
            read_pos: 0,
            lines: Vec::new(),
        }
    }

    fn poll_lines(&mut self) -> Vec<String> {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let mut new = Vec::new();
        if let Some(end) = text[self.read_pos.min(text.len())..].rfind('\n') {
            let chunk = &text[self.read_pos..self.read_pos + end + 1];
            for l in chunk.lines() {
                let l = l.trim_end_matches('\r').to_string();
                new.push(l.clone());
                self.lines.push(l);
            }
            self.read_pos += end + 1;
        }
        new
    }

    /// Waits for a console line starting with `prefix`; returns it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        // Lines already read count too.
        if let Some(l) = self.lines.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        loop {
            for l in self.poll_lines() {
                if l.starts_with(prefix) {
                    return l;
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({st}) before {prefix:?}; console:\n{}",
                    self.console()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {prefix:?} within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next line starting with `prefix` that was not seen before.
    pub fn next(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            for l in self.poll_lines() {
                if l.starts_with(prefix) {
                    return l;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no new {prefix:?} within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET; returns the body (panics on a non-200 answer).
pub fn http_get(port: u16, path: &str) -> Vec<u8> {
    HttpConn::connect(port).get(path)
}

/// A connection to a forwarded HTTP server, opened before its one request is sent (so many
/// requests can be put in flight at once).
pub struct HttpConn(TcpStream);

impl HttpConn {
    pub fn connect(port: u16) -> HttpConn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the forward");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        HttpConn(s)
    }

    /// Sends one HTTP/1.0 GET and returns the body (panics on a non-200 answer).
    pub fn get(mut self, path: &str) -> Vec<u8> {
        write!(self.0, "GET {path} HTTP/1.0\r\nHost: box\r\n\r\n").unwrap();
        let mut resp = Vec::new();
        self.0.read_to_end(&mut resp).unwrap();
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP header");
        let head = String::from_utf8_lossy(&resp[..split]);
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        resp[split + 4..].to_vec()
    }
}

/// Descriptors open in this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Resident memory of this process in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Copies a host program and every library `ldd` lists for it to the same paths under `root`.
fn copy_with_libraries(program: &Path, root: &Path) {
    let out = Command::new("ldd").arg(program).output().unwrap();
    let mut files = vec![program.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dst).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}
