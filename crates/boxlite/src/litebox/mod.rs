//! The handle to one Box: start it, run processes in it, stop it, remove it.
//!
//! Lifecycle operations on one Box take an exclusive lock on `boxes/<id>/lock`, so two CLIs acting
//! on the same Box at once run one after the other and never leave half-written state.

pub mod exec;
pub mod snapshot;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::{Control, ExecRequest};
use nix::fcntl::{Flock, FlockArg};
use tracing::info;

use crate::runtime::config::merge_env;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::{shim_alive, BoxRecord, BoxState};
use crate::runtime::{io_err, Result, Runtime, RuntimeError};
use crate::vmm::accel::{self, AccelDecision};
use crate::vmm::qemu::QemuEngine;
use crate::vmm::GuestAssets;
pub use exec::{ExecError, ExecSession, ExitStatus, Output, SessionControl};
pub use snapshot::{BoxSnapshot, SnapshotError};

/// What to run with [`LiteBox::exec`]. Empty fields take the Box's defaults (image env, working
/// dir and user).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    pub rows: u16,
    pub cols: u16,
}

/// One Box.
#[derive(Debug, Clone)]
pub struct LiteBox {
    runtime: Runtime,
    record: BoxRecord,
}

impl LiteBox {
    pub(crate) fn new(runtime: Runtime, record: BoxRecord) -> LiteBox {
        LiteBox { runtime, record }
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }
    pub fn name(&self) -> &str {
        &self.record.name
    }
    /// The record as of the last refresh.
    pub fn record(&self) -> &BoxRecord {
        &self.record
    }
    pub fn paths(&self) -> BoxPaths {
        BoxPaths::new(self.runtime.home(), &self.record.id)
    }

    /// Reloads the record from the database (state reconciled).
    pub fn refresh(&mut self) -> Result<&BoxRecord> {
        let db = self.runtime.db()?;
        let record = BoxRecord::get(&db, &self.record.id)?
            .ok_or_else(|| RuntimeError::BoxNotFound(self.record.name.clone()))?;
        self.record = record.reconcile(&db)?;
        Ok(&self.record)
    }

    fn lock(&self) -> Result<Flock<File>> {
        let paths = self.paths();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(paths.lock_file())
            .map_err(io_err(format!(
                "cannot open {}",
                paths.lock_file().display()
            )))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| RuntimeError::Io {
            context: "cannot lock the box".into(),
            source: e.into(),
        })
    }

    /// Decides the accelerator for this Box (see [`accel::decide`]).
    pub fn accel_decision(&self) -> Result<AccelDecision> {
        let assets = GuestAssets::locate()?;
        Ok(accel::decide(
            self.record.config.accel,
            &QemuEngine::default(),
            &assets,
            self.runtime.home().root(),
        )?)
    }

    /// Boots the Box. With `attach`, the main process waits for [`LiteBox::attach`] (up to 30 s)
    /// so no output is lost; otherwise it starts at once with its output in `main.log`.
    pub fn start(&mut self, attach: bool) -> Result<AccelDecision> {
        let _lock = self.lock()?;
        self.refresh()?;
        if matches!(
            self.record.state,
            BoxState::Running | BoxState::Starting | BoxState::Stopping
        ) {
            return Err(RuntimeError::InvalidState {
                name: self.record.name.clone(),
                state: self.record.state,
                operation: "start",
            });
        }
        let decision = self.accel_decision()?;
        let paths = self.paths();
        let shim = shim_program()?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(paths.shim_log())
            .map_err(io_err(format!(
                "cannot open {}",
                paths.shim_log().display()
            )))?;
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| RuntimeError::Io {
            context: "cannot create a pipe".into(),
            source: e.into(),
        })?;
        let mut cmd = Command::new(&shim);
        cmd.arg("--home")
            .arg(self.runtime.home().root())
            .arg("--box")
            .arg(&self.record.id)
            .arg("--accel")
            .arg(decision.accel.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("shim log"))?)
            .stderr(log);
        if attach {
            cmd.arg("--attach");
        }
        let ready_w_fd = ready_w.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls: setsid and dup2. The shim
        // gets its own session (no terminal signals from the CLI) and the pipe's write end as fd 3.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                if libc::dup2(ready_w_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("cannot start {}", shim.display())))?;
        drop(ready_w);
        let db = self.runtime.db()?;
        BoxRecord::mark_starting(&db, &self.record.id, child.id())?;
        // Reap the shim if it exits while this process still runs (library users).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let verdict = read_ready(ready_r);
        self.refresh()?;
        match verdict {
            Some(line) if line == "ok" => {
                info!(box_id = %self.record.id, "box running");
                Ok(decision)
            }
            other => {
                let message = match other {
                    Some(line) => line.trim_start_matches("error: ").replace(" | ", "\n"),
                    None => format!(
                        "the shim exited without reporting (see {})",
                        paths.shim_log().display()
                    ),
                };
                // The shim is gone or on its way out; `ls` shows why the Box is not running.
                let first_line = message.lines().next().unwrap_or_default();
                let reason = format!("failed to start: {first_line}");
                let _ = BoxRecord::mark_exited(&db, &self.record.id, &reason, None);
                self.refresh()?;
                Err(RuntimeError::Start {
                    name: self.record.name.clone(),
                    message,
                })
            }
        }
    }

    fn require_running(&mut self, operation: &'static str) -> Result<()> {
        self.refresh()?;
        if self.record.state != BoxState::Running {
            return Err(RuntimeError::InvalidState {
                name: self.record.name.clone(),
                state: self.record.state,
                operation,
            });
        }
        Ok(())
    }

    /// Starts a process in the running Box.
    pub fn exec(&mut self, opts: ExecOptions) -> Result<ExecSession> {
        self.require_running("exec")?;
        if opts.argv.is_empty() {
            return Err(RuntimeError::Invalid("exec needs a command".into()));
        }
        let defaults = &self.record.config.exec_defaults;
        let mut env = merge_env(&defaults.env, &opts.env);
        if opts.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        let req = ExecRequest {
            argv: opts.argv,
            env,
            cwd: opts.cwd.unwrap_or_else(|| defaults.cwd.clone()),
            user: opts.user.unwrap_or_else(|| defaults.user.clone()),
            tty: opts.tty,
            stdin: opts.stdin,
            rows: opts.rows,
            cols: opts.cols,
        };
        self.session(Control::Exec(Box::new(req)))
    }

    /// Runs `argv` with the Box's defaults and collects its output.
    pub fn exec_output(&mut self, argv: &[&str]) -> Result<Output> {
        let opts = ExecOptions {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let session = self.exec(opts)?;
        session.output().map_err(|e| RuntimeError::Shim {
            name: self.record.name.clone(),
            message: e.to_string(),
        })
    }

    /// Attaches to the Box's main process (its output from now on, its stdin, its exit).
    pub fn attach(&mut self, stdin: bool, rows: u16, cols: u16) -> Result<ExecSession> {
        self.require_running("attach")?;
        self.session(Control::Attach { stdin, rows, cols })
    }

    /// Asks the running Box's shim one question and returns its answer.
    fn query(&mut self, request: Control, operation: &'static str) -> Result<Control> {
        self.require_running(operation)?;
        let socket = self.paths().control_socket();
        let answer = exec::query(&socket, &request).map_err(io_err(format!(
            "cannot reach box {} at {}",
            self.record.name,
            socket.display()
        )))?;
        match answer {
            Control::Error { message } => Err(RuntimeError::Shim {
                name: self.record.name.clone(),
                message,
            }),
            other => Ok(other),
        }
    }

    fn query_json(
        &mut self,
        request: Control,
        operation: &'static str,
    ) -> Result<serde_json::Value> {
        match self.query(request, operation)? {
            Control::Info { json } => serde_json::from_str(&json).map_err(|e| RuntimeError::Shim {
                name: self.record.name.clone(),
                message: format!("bad answer from the shim: {e}"),
            }),
            other => Err(RuntimeError::Shim {
                name: self.record.name.clone(),
                message: format!("unexpected answer from the shim: {other:?}"),
            }),
        }
    }

    /// Network counters (from the backend) and resource use (VMM memory and CPU, disk).
    pub fn stats(&mut self) -> Result<serde_json::Value> {
        let mut value = self.query_json(Control::Stats, "report stats")?;
        let vmm = self.record.vmm_pid.and_then(process_usage);
        let disk = std::fs::metadata(self.paths().disk()).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        value["resources"] = serde_json::json!({
            "vmm_rss_bytes": vmm.map(|u| u.0),
            "vmm_cpu_seconds": vmm.map(|u| u.1),
            "disk_allocated_bytes": disk,
            "cpus": self.record.config.cpus,
            "memory_mib": self.record.config.memory_mib,
        });
        Ok(value)
    }

    /// Adds a port forward: to the running Box at once (the answer has the port chosen when
    /// the host port was 0), and to the Box's config, so that it survives stop and start. A
    /// Box that is not running only records it for its next start.
    pub fn port_add(
        &mut self,
        forward: &crate::net::PortForward,
    ) -> Result<crate::net::PortForward> {
        self.refresh()?;
        if self.record.config.network == crate::net::NetworkKind::None {
            return Err(RuntimeError::Invalid(format!(
                "cannot publish port {} on box {}: it was created with --network none",
                forward.to_spec(),
                self.record.name
            )));
        }
        let added = if self.record.state == BoxState::Running {
            let value = self.query_json(
                Control::PortAdd {
                    forward: forward.to_spec(),
                },
                "add a port",
            )?;
            serde_json::from_value(value).map_err(|e| RuntimeError::Shim {
                name: self.record.name.clone(),
                message: format!("bad answer from the shim: {e}"),
            })?
        } else {
            *forward
        };
        self.update_ports(|ports| {
            if !ports.contains(&added) {
                ports.push(added);
            }
            Ok(())
        })?;
        Ok(added)
    }

    /// Removes a port forward from the running Box (if it runs) and from its config.
    pub fn port_remove(&mut self, forward: &crate::net::PortForward) -> Result<()> {
        self.refresh()?;
        let running = self.record.state == BoxState::Running;
        if running {
            self.query(
                Control::PortRemove {
                    forward: forward.to_spec(),
                },
                "remove a port",
            )?;
        }
        let f = *forward;
        let name = self.record.name.clone();
        self.update_ports(move |ports| {
            let before = ports.len();
            ports.retain(|p| *p != f);
            if ports.len() == before {
                // A `-p 0:GUEST` forward is stored with port 0 and runs on the port picked at
                // start: removing the running one removes the stored one.
                if let Some(i) = ports.iter().position(|p| {
                    p.host_port == 0
                        && (p.host_ip, p.guest_port, p.protocol)
                            == (f.host_ip, f.guest_port, f.protocol)
                }) {
                    ports.remove(i);
                }
            }
            if ports.len() == before && !running {
                return Err(RuntimeError::Invalid(format!(
                    "box {name} has no port forward {}",
                    f.to_spec()
                )));
            }
            Ok(())
        })
    }

    /// The forward `spec` names: a full `[IP:]HOSTPORT:GUESTPORT[/PROTO]`, or a bare
    /// `HOSTPORT[/PROTO]` when exactly one of the Box's forwards has that host port.
    pub fn resolve_forward(&mut self, spec: &str) -> Result<crate::net::PortForward> {
        let bare = spec
            .split_once('/')
            .map_or((spec, None), |(p, proto)| (p, Some(proto)));
        let Ok(host_port) = bare.0.parse::<u16>() else {
            return spec
                .parse()
                .map_err(|e: crate::net::NetworkError| RuntimeError::Invalid(e.to_string()));
        };
        let matching: Vec<crate::net::PortForward> = self
            .ports()?
            .into_iter()
            .filter(|p| p.host_port == host_port)
            .filter(|p| bare.1.is_none_or(|proto| p.protocol.to_string() == proto))
            .collect();
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(RuntimeError::Invalid(format!(
                "box {} has no port forward on host port {spec}",
                self.record.name
            ))),
            many => Err(RuntimeError::Invalid(format!(
                "host port {spec} of box {} is ambiguous ({}): give the whole forward",
                self.record.name,
                many.iter()
                    .map(|p| p.to_spec())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Changes the stored port forwards under the Box's lock.
    fn update_ports(
        &mut self,
        change: impl FnOnce(&mut Vec<crate::net::PortForward>) -> Result<()>,
    ) -> Result<()> {
        let _lock = self.lock()?;
        let db = self.runtime.db()?;
        let mut record = BoxRecord::get(&db, &self.record.id)?
            .ok_or_else(|| RuntimeError::BoxNotFound(self.record.name.clone()))?;
        change(&mut record.config.ports)?;
        BoxRecord::update_config(&db, &record.id, &record.config)?;
        self.refresh()?;
        Ok(())
    }

    /// The forwards in effect while running, else the ones the Box was created with.
    pub fn ports(&mut self) -> Result<Vec<crate::net::PortForward>> {
        self.refresh()?;
        if self.record.state != BoxState::Running {
            return Ok(self.record.config.ports.clone());
        }
        let value = self.query_json(Control::Ports, "list ports")?;
        serde_json::from_value(value).map_err(|e| RuntimeError::Shim {
            name: self.record.name.clone(),
            message: format!("bad answer from the shim: {e}"),
        })
    }

    fn session(&self, request: Control) -> Result<ExecSession> {
        let socket = self.paths().control_socket();
        ExecSession::open(&socket, request).map_err(io_err(format!(
            "cannot reach box {} at {}",
            self.record.name,
            socket.display()
        )))
    }

    /// Stops the Box as `docker stop -t` does: its processes get SIGTERM and `timeout` to exit
    /// before SIGKILL; then the guest syncs its disks and powers off (the VMM is killed if it
    /// has not shortly after). Stopping a Box that is not running does nothing.
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        let _lock = self.lock()?;
        self.refresh()?;
        if self.record.state != BoxState::Running {
            return Ok(());
        }
        if let Ok(session) = self.session(Control::Stop {
            timeout_secs: timeout.as_secs(),
        }) {
            // The shim closes every connection when the guest is gone.
            let _ = session.wait(&mut std::io::sink(), &mut std::io::sink());
        }
        self.wait_shim_gone(timeout + crate::shim::POWEROFF_MARGIN + Duration::from_secs(15))
    }

    /// Waits for the Box's shim to exit: the shim records the final state (or removes an
    /// auto-remove Box) before it exits, so afterwards the state on disk is final.
    fn wait_shim_gone(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let mut pid = self.record.shim_pid;
        loop {
            let alive = pid.is_some_and(|p| shim_alive(p, &self.record.id));
            if !alive {
                match self.refresh() {
                    Ok(r) if r.shim_pid.is_some() && r.shim_pid != pid => pid = r.shim_pid,
                    Ok(_) | Err(RuntimeError::BoxNotFound(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
                continue;
            }
            if started.elapsed() > limit {
                return Err(RuntimeError::Shim {
                    name: self.record.name.clone(),
                    message: "the shim did not exit after stop".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the Box is no longer running (its main process ended or it was stopped).
    pub fn wait_stopped(&mut self) -> Result<()> {
        self.wait_shim_gone(Duration::from_secs(u64::MAX / 4))
    }

    /// Removes the Box and everything it owns. A running Box only with `force`: its shim and VMM
    /// are killed first.
    pub fn remove(mut self, force: bool) -> Result<()> {
        let _lock = self.lock()?;
        self.refresh()?;
        if matches!(
            self.record.state,
            BoxState::Running | BoxState::Starting | BoxState::Stopping
        ) {
            if !force {
                return Err(RuntimeError::InvalidState {
                    name: self.record.name.clone(),
                    state: self.record.state,
                    operation: "remove (stop it first or use rm -f)",
                });
            }
            self.kill();
        }
        let paths = self.paths();
        paths.remove_sockets();
        std::fs::remove_dir_all(&paths.dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err(format!("cannot remove {}", paths.dir.display())))?;
        BoxRecord::delete(&self.runtime.db()?, &self.record.id)?;
        Ok(())
    }

    /// Kills the shim and the VMM at once (the VMM dies with its shim) and waits for both.
    fn kill(&mut self) {
        let pids = [self.record.vmm_pid, self.record.shim_pid];
        if let Some(pid) = self
            .record
            .shim_pid
            .filter(|&p| shim_alive(p, &self.record.id))
        {
            // SAFETY: plain kill(2); the pid was checked to be this Box's shim just now.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(pid) = self.record.vmm_pid {
            if vmm_of_box(pid, &self.record.id, &self.runtime) {
                // SAFETY: plain kill(2) of this Box's VMM, checked by its command line.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10)
            && pids
                .iter()
                .flatten()
                .any(|p| PathBuf::from(format!("/proc/{p}")).exists() && !zombie(*p))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(db) = self.runtime.db() {
            let _ = BoxRecord::mark_exited(&db, &self.record.id, "killed", None);
        }
    }
}

/// Resident bytes and CPU seconds of a process, from /proc.
fn process_usage(pid: i64) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((rss_kib * 1024, ticks as f64 / hz))
}

fn zombie(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn vmm_of_box(pid: i64, id: &str, runtime: &Runtime) -> bool {
    let paths = BoxPaths::new(runtime.home(), id);
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*paths.agent_socket().to_string_lossy()))
        .unwrap_or(false)
}

/// Reads the shim's one readiness line (`None` if it closed the pipe without one).
fn read_ready(fd: OwnedFd) -> Option<String> {
    // SAFETY: `fd` is the pipe's read end, owned here and handed over to the File.
    let file = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    let mut line = String::new();
    match BufReader::new(file).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim_end().to_string()),
        _ => None,
    }
}

/// Finds the `boxlite-shim` program: `$BOXLITE_SHIM`, next to the running executable (or one
/// folder up, for test binaries under `target/*/deps`), else `PATH`.
fn shim_program() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BOXLITE_SHIM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("boxlite-shim");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Ok(PathBuf::from("boxlite-shim"))
}
