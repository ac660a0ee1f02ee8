//! Shared by the CLI's integration tests: a throw-away home folder, the `boxlite` binary run
//! against it, and small real images built with real tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The repository root (for scripts/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// A home folder of its own, removed (with its Boxes killed) when dropped.
pub struct Env {
    pub home: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            home: tempfile::Builder::new()
                .prefix("bl")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlite"));
        cmd.env("BOXLITE_HOME", self.home.path())
            .env("BOXLITE_ACCEL", "tcg")
            .env_remove("BOXLITE_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `boxlite ARGS` to the end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("boxlite runs")
    }

    /// Runs `boxlite ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "boxlite {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn boxes_dir(&self) -> PathBuf {
        self.home.path().join("boxes")
    }

    /// `ls --json` parsed.
    pub fn ls(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["ls", "--json"])).unwrap()
    }

    pub fn state_of(&self, name: &str) -> serde_json::Value {
        self.ls()
            .into_iter()
            .find(|b| b["name"] == name)
            .unwrap_or(serde_json::Value::Null)
    }

    /// Imports the busybox test image as `localhost/busybox:test` and returns that reference.
    pub fn busybox(&self) -> &'static str {
        let layout = busybox_layout();
        self.ok(&[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--tag",
            "localhost/busybox:test",
        ]);
        "localhost/busybox:test"
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-f"]).args(self.names()).output();
    }
}

impl Env {
    fn names(&self) -> Vec<String> {
        match self.cmd().args(["ls", "--json"]).output() {
            Ok(out) => serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap_or_default()
                .iter()
                .filter_map(|b| b["name"].as_str().map(String::from))
                .collect(),
            Err(_) => vec![],
        }
    }
}

/// An OCI layout of the busybox test image, made once per test binary by
/// `scripts/make-busybox-image.sh` (umoci + Debian's busybox-static).
pub fn busybox_layout() -> PathBuf {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("boxlite-test-busybox-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let status = Command::new("bash")
                .arg(repo_root().join("scripts/make-busybox-image.sh"))
                .arg(&dir)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "make-busybox-image.sh failed");
            dir
        })
        .clone()
}

/// Processes whose command line mentions `needle` (zombies excluded: they hold nothing).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if text.contains(needle) && !zombie && pid != std::process::id().to_string() {
            found.push(format!("{pid}: {text}"));
        }
    }
    found
}

/// Debian's `docker-registry` on 127.0.0.1 with its storage in a temp dir; killed on drop.
pub struct Registry {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry) runs");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed().as_secs() < 20, "registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry {
            port,
            child,
            _dir: dir,
        }
    }

    /// Pushes `oci:LAYOUT:TAG` to `127.0.0.1:PORT/REPO` with skopeo; returns the reference.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> String {
        let reference = format!("127.0.0.1:{}/{repo}", self.port);
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An OCI layout of Debian bookworm (debootstrap --variant=minbase + umoci), tag `bookworm`.
pub fn debian_layout() -> PathBuf {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("boxlite-test-debian-{}", std::process::id()));
            let status = Command::new("bash")
                .arg(repo_root().join("scripts/make-debian-image.sh"))
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "make-debian-image.sh failed");
            dir
        })
        .clone()
}

impl Env {
    /// The disk file of Box `name` (from `inspect`).
    pub fn disk_of(&self, name: &str) -> PathBuf {
        let inspect: serde_json::Value =
            serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        PathBuf::from(
            inspect["paths"]["disk"]
                .as_str()
                .expect("inspect names the disk"),
        )
    }

    /// Imports the Debian test image as `localhost/debian:test` and returns that reference.
    pub fn debian(&self) -> &'static str {
        let layout = debian_layout();
        self.ok(&[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--tag",
            "localhost/debian:test",
        ]);
        "localhost/debian:test"
    }

    /// The base disks under `images/rootfs/`.
    pub fn base_disks(&self) -> Vec<PathBuf> {
        let dir = self.home.path().join("images/rootfs");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        found.retain(|p| p.extension().is_some_and(|x| x == "raw"));
        found.sort();
        found
    }
}

/// Bytes a file occupies on the host (`du`).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `qemu-img check` of a qcow2 file: clean (no errors, corruptions or leaks).
pub fn assert_qcow2_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --backing-chain --output=json`, top image first.
pub fn backing_chain(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// sha256 of a file on the host.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}
