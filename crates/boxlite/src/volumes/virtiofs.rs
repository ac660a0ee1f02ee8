//! Host folder shares (`-v HOST:GUEST[:ro]`) over virtio-fs: one `virtiofsd` (the Rust
//! vhost-user daemon, crate `virtiofsd` 1.14, installed by `scripts/setup-virtiofsd.sh`) per
//! share, and the QEMU arguments that connect a `vhost-user-fs` device to it (virtio spec 1.2
//! §5.11 "File System Device"; QEMU docs "virtiofsd" and "vhost-user").
//!
//! - Read-only is enforced on the host (`virtiofsd --readonly`), not trusted to the guest's
//!   mount options.
//! - vhost-user needs guest RAM the daemon can map: the VM's memory must come from a shared
//!   memfd backend. [`memory_backend_args`] gives those arguments; they appear once per VM,
//!   whatever the number of shares.
//! - A single-file share is a hard link to the file inside a private folder that is shared in
//!   its place, so the guest sees that one file and not its siblings (the guest bind-mounts it,
//!   [`SharePlan::file`]). Across filesystems a hard link is impossible: a read-only share then
//!   falls back to sharing the file's folder read-only (siblings become visible, read-only; a
//!   warning says so) and a writable one is refused. A host program that replaces the file by
//!   renaming a new one over it breaks the link; the guest keeps the old contents.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest socket path a unix socket address holds (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest virtio-fs tag (virtio spec: 36 bytes).
pub const MAX_TAG: usize = 36;
/// How long `virtiofsd` may take to create its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure to prepare or start a share.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsError {
    /// No virtiofsd binary was found.
    #[error("virtiofsd not found (run scripts/setup-virtiofsd.sh, or set BOXLITE_VIRTIOFSD)")]
    NotInstalled,
    /// The host path to share does not exist or is neither a folder nor a file.
    #[error("cannot share {path}: it is not an existing folder or regular file")]
    BadSource { path: PathBuf },
    /// A writable single-file share across filesystems.
    #[error("cannot share file {path} read-write: it is on another filesystem than {staging} (share its folder instead, or add :ro)")]
    CrossDevice { path: PathBuf, staging: PathBuf },
    /// The socket path does not fit a unix socket address.
    #[error("socket path {path} is {len} bytes; unix sockets allow {MAX_SOCKET_PATH}")]
    SocketPathTooLong { path: PathBuf, len: usize },
    /// A tag boxlite does not accept.
    #[error("invalid virtiofs tag {tag:?} (1 to 36 of letters, digits, '_', '-', '.')")]
    BadTag { tag: String },
    /// virtiofsd exited or never created its socket.
    #[error("virtiofsd for {shared_dir} did not start: {reason}")]
    Start { shared_dir: PathBuf, reason: String },
    /// A filesystem or process operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, VirtiofsError>;

/// The folder to export for one `-v HOST:GUEST[:ro]`, and the file inside it when the user
/// shared a single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePlan {
    /// The folder virtiofsd exports.
    pub shared_dir: PathBuf,
    /// For a single-file share: the file's name inside `shared_dir` (goes to
    /// `MountSpec.file`; the guest bind-mounts it onto the target).
    pub file: Option<String>,
    pub readonly: bool,
}

/// Decides what to export for host path `source`. Single files are hard-linked into
/// `staging` (a private folder of the Box, e.g. `boxes/<id>/shares/<n>`, created here).
pub fn plan_share(source: &Path, readonly: bool, staging: &Path) -> Result<SharePlan> {
    // Resolve symlinks: a hard link to a symlink would show the guest a dangling link.
    let source = &std::fs::canonicalize(source).map_err(|_| VirtiofsError::BadSource {
        path: source.to_path_buf(),
    })?;
    let meta = std::fs::metadata(source).map_err(|_| VirtiofsError::BadSource {
        path: source.to_path_buf(),
    })?;
    if meta.is_dir() {
        return Ok(SharePlan {
            shared_dir: source.to_path_buf(),
            file: None,
            readonly,
        });
    }
    if !meta.is_file() {
        return Err(VirtiofsError::BadSource {
            path: source.to_path_buf(),
        });
    }
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| VirtiofsError::BadSource {
            path: source.to_path_buf(),
        })?;
    std::fs::create_dir_all(staging).map_err(|source_err| VirtiofsError::Io {
        op: "create",
        path: staging.to_path_buf(),
        source: source_err,
    })?;
    let link = staging.join(&name);
    let _ = std::fs::remove_file(&link);
    match std::fs::hard_link(source, &link) {
        Ok(()) => Ok(SharePlan {
            shared_dir: staging.to_path_buf(),
            file: Some(name),
            readonly,
        }),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) && readonly => {
            let parent = source.parent().unwrap_or(Path::new("/")).to_path_buf();
            tracing::warn!(
                file = %source.display(),
                folder = %parent.display(),
                "file is on another filesystem; sharing its whole folder read-only"
            );
            Ok(SharePlan {
                shared_dir: parent,
                file: Some(name),
                readonly: true,
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Err(VirtiofsError::CrossDevice {
            path: source.to_path_buf(),
            staging: staging.to_path_buf(),
        }),
        Err(e) => Err(VirtiofsError::Io {
            op: "link",
            path: source.to_path_buf(),
            source: e,
        }),
    }
}

/// Finds virtiofsd: `BOXLITE_VIRTIOFSD`, then `PATH`, then `/usr/local/bin` and
/// `/usr/libexec` (where distributions put it).
pub fn find_virtiofsd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BOXLITE_VIRTIOFSD") {
        return Ok(PathBuf::from(p));
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain([
            "/usr/local/bin".into(),
            "/usr/libexec".into(),
            "/usr/lib/qemu".into(),
        ])
        .map(|d| d.join("virtiofsd"))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or(VirtiofsError::NotInstalled)
}

/// How QEMU exposes virtio devices on the chosen machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `vhost-user-fs-pci` (pc, q35).
    Pci,
    /// `vhost-user-fs-device` on virtio-mmio (microvm; needs
    /// `-global virtio-mmio.force-legacy=false`).
    Mmio,
}

/// Options for one virtiofsd.
#[derive(Debug, Clone)]
pub struct ShareOptions {
    /// virtio-fs tag the guest mounts (`mount -t virtiofs TAG /target`).
    pub tag: String,
    /// The vhost-user socket virtiofsd listens on (must fit `sun_path`).
    pub socket_path: PathBuf,
    /// Where virtiofsd's stderr goes; `None` discards it.
    pub log_path: Option<PathBuf>,
    /// `--cache`: `auto` (default) keeps the guest coherent with host changes at close/open.
    pub cache: String,
    /// `--log-level` for the log file (`info` logs client connects and disconnects).
    pub log_level: String,
    /// `--sandbox`: `namespace` when running as root, else `none` (an unprivileged virtiofsd
    /// cannot set up its mount namespace without user-namespace mappings).
    pub sandbox: String,
    /// Host user and group that the guest's root stands for (`--translate-uid/gid map:0:ID:1`),
    /// set when running unprivileged, as rootless podman does: files the host user owns show
    /// as root's in the guest, and files guest root creates or chowns to root belong to the
    /// host user. Root runs untranslated.
    pub root_as: Option<(u32, u32)>,
}

impl ShareOptions {
    /// Defaults for `tag` and `socket_path`.
    pub fn new(tag: &str, socket_path: &Path) -> ShareOptions {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let root = uid == 0;
        ShareOptions {
            tag: tag.to_string(),
            socket_path: socket_path.to_path_buf(),
            log_path: None,
            cache: "auto".to_string(),
            log_level: "info".to_string(),
            sandbox: if root { "namespace" } else { "none" }.to_string(),
            root_as: (!root).then_some((uid, gid)),
        }
    }
}

/// Translation rules that make host id `id` the guest's 0 and every other host id the guest's
/// `nobody` (65534), so that nothing the host user does not own looks like root's in the guest.
fn root_as_args(flag: &str, id: u32) -> Vec<String> {
    const NOBODY: u32 = 65534;
    let mut rules = vec![format!("map:0:{id}:1")];
    if id > 0 {
        rules.push(format!("squash-host:0:{NOBODY}:{id}"));
    }
    if id < u32::MAX - 1 {
        rules.push(format!(
            "squash-host:{}:{NOBODY}:{}",
            id + 1,
            u32::MAX - 1 - id
        ));
    }
    rules
        .into_iter()
        .flat_map(|r| [flag.to_string(), r])
        .collect()
}

/// A running virtiofsd serving one share. Killed when dropped (it also exits by itself once
/// QEMU disconnects).
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    socket_path: PathBuf,
    tag: String,
    shared_dir: PathBuf,
}

fn validate_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(VirtiofsError::BadTag {
            tag: tag.to_string(),
        })
    }
}

impl Virtiofsd {
    /// Starts virtiofsd for `plan` and waits (up to [`START_TIMEOUT`]) for its socket.
    pub fn spawn(plan: &SharePlan, options: &ShareOptions) -> Result<Virtiofsd> {
        validate_tag(&options.tag)?;
        let socket_len = options.socket_path.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(VirtiofsError::SocketPathTooLong {
                path: options.socket_path.clone(),
                len: socket_len,
            });
        }
        let program = find_virtiofsd()?;
        let _ = std::fs::remove_file(&options.socket_path);
        let stderr = match &options.log_path {
            Some(p) => Stdio::from(std::fs::File::create(p).map_err(|e| VirtiofsError::Io {
                op: "create",
                path: p.clone(),
                source: e,
            })?),
            None => Stdio::null(),
        };
        let mut cmd = Command::new(&program);
        cmd.arg("--shared-dir")
            .arg(&plan.shared_dir)
            .arg("--socket-path")
            .arg(&options.socket_path)
            .arg("--tag")
            .arg(&options.tag)
            .arg("--cache")
            .arg(&options.cache)
            .arg("--sandbox")
            .arg(&options.sandbox)
            .arg("--log-level")
            .arg(&options.log_level);
        if plan.readonly {
            cmd.arg("--readonly");
        }
        if let Some((uid, gid)) = options.root_as {
            cmd.args(root_as_args("--translate-uid", uid))
                .args(root_as_args("--translate-gid", gid));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| VirtiofsError::Io {
                op: "start",
                path: program.clone(),
                source: e,
            })?;
        let mut daemon = Virtiofsd {
            child,
            socket_path: options.socket_path.clone(),
            tag: options.tag.clone(),
            shared_dir: plan.shared_dir.clone(),
        };
        daemon.wait_for_socket(options.log_path.as_deref())?;
        tracing::debug!(
            tag = %daemon.tag,
            shared_dir = %daemon.shared_dir.display(),
            readonly = plan.readonly,
            pid = daemon.child.id(),
            "virtiofsd started"
        );
        Ok(daemon)
    }

    fn wait_for_socket(&mut self, log: Option<&Path>) -> Result<()> {
        let fail = |reason: String| VirtiofsError::Start {
            shared_dir: self.shared_dir.clone(),
            reason,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let output = log
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                return Err(fail(format!("exited with {status}: {}", output.trim())));
            }
            let is_socket = std::fs::symlink_metadata(&self.socket_path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                .unwrap_or(false);
            if is_socket {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(fail(format!(
                    "no socket at {} after {:?}",
                    self.socket_path.display(),
                    START_TIMEOUT
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the daemon still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The QEMU arguments for this share as device number `index` (unique per VM): a socket
    /// chardev and a `vhost-user-fs` device. Add [`memory_backend_args`] once per VM.
    pub fn qemu_args(&self, index: usize, transport: Transport) -> Vec<String> {
        let device = match transport {
            Transport::Pci => "vhost-user-fs-pci",
            Transport::Mmio => "vhost-user-fs-device",
        };
        vec![
            "-chardev".into(),
            format!(
                "socket,id=fs{index},path={}",
                qemu_escape(&self.socket_path.to_string_lossy())
            ),
            "-device".into(),
            format!(
                "{device},queue-size=1024,chardev=fs{index},tag={}",
                self.tag
            ),
        ]
    }

    /// Stops the daemon and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest-memory arguments vhost-user devices need, once per VM: all of the guest's
/// `mem_mib` MiB from a shared memfd, as NUMA node 0. (With `-M microvm` use
/// `-machine memory-backend=mem` instead of `-numa`: pass `numa = false`.)
pub fn memory_backend_args(mem_mib: u64, numa: bool) -> Vec<String> {
    let mut args = vec![
        "-object".to_string(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
    ];
    if numa {
        args.extend(["-numa".to_string(), "node,memdev=mem".to_string()]);
    } else {
        args.extend(["-machine".to_string(), "memory-backend=mem".to_string()]);
    }
    args
}

/// Doubles commas, QEMU's escape inside an option value.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_escaping() {
        assert!(validate_tag("share0").is_ok());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("a,b").is_err());
        assert!(validate_tag(&"t".repeat(37)).is_err());
        assert_eq!(qemu_escape("/a,b/s.sock"), "/a,,b/s.sock");
        let args = memory_backend_args(512, true);
        assert_eq!(
            args,
            [
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-numa",
                "node,memdev=mem"
            ]
        );
    }
}
