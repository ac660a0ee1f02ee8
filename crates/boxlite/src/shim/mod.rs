//! The shim: one process per running Box, started by [`crate::litebox::LiteBox::start`] and
//! outliving the CLI that started it. It owns the VMM process, the network backend and the
//! agent connection; CLIs reach it over the Box's control socket with the same frames the agent
//! speaks (see `boxlite_protocol`), and it routes each exec session between a CLI and the agent.
//!
//! Life of a shim: boot the guest, send the agent its setup, report readiness on the pipe the
//! starter gave it, start the Box's main process, serve CLIs, and when the guest powers off (the
//! main process ended, `stop`, or a crash) record why in the state database and clean up.

pub mod mounts;
mod router;
mod setup;

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use boxlite_protocol::{read_frame, write_frame, Control, Frame, BOX_CHANNEL, PROTOCOL_VERSION};
use tracing::{error, info, warn};

use crate::home::Home;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::BoxRecord;
use crate::state::Db;
use crate::vmm::accel::Accel;
use crate::vmm::qemu::QemuEngine;
use crate::vmm::{Engine, GuestAssets};

/// `error` and its causes on one line (`a: b: c`), for messages that cross a process boundary
/// as text (the shim's answers and its start report), where the chain would otherwise be lost.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// After a stop's grace period, how long the guest has to kill what is left, sync, unmount and
/// power off before the VMM is killed.
pub(crate) const POWEROFF_MARGIN: Duration = Duration::from_secs(10);

pub use router::{exit_code_for_exec_error, MAIN_CHANNEL};

/// How long the guest may take from launch to the agent's `Ready` (TCG under load is slow).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// What the starter tells a shim.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub home: PathBuf,
    pub box_id: String,
    pub accel: Accel,
    /// Wait for a CLI to attach before starting the main process (`run` without `-d`).
    pub attach: bool,
    /// File descriptor of the readiness pipe (`ok\n` or `error: …\n`).
    pub ready_fd: Option<i32>,
}

/// Runs a shim to the end; returns the process exit code.
pub fn run(args: ShimArgs) -> i32 {
    let mut ready = args.ready_fd.map(|fd| {
        // SAFETY: the starter passes this descriptor open and owned by us alone.
        unsafe { File::from_raw_fd(fd) }
    });
    match boot_and_serve(&args, &mut ready) {
        Ok(()) => 0,
        Err(message) => {
            error!(box_id = %args.box_id, "{message}");
            if let Some(mut r) = ready.take() {
                let _ = writeln!(r, "error: {}", message.replace('\n', " | "));
            }
            1
        }
    }
}

fn boot_and_serve(args: &ShimArgs, ready: &mut Option<File>) -> Result<(), String> {
    let home = Home::open(&args.home).map_err(|e| format!("cannot open home: {e}"))?;
    let db = Db::open(&home).map_err(|e| format!("cannot open state database: {e}"))?;
    let record = BoxRecord::get(&db, &args.box_id)
        .map_err(|e| format!("cannot read box: {e}"))?
        .ok_or_else(|| format!("no box with id {}", args.box_id))?;
    let paths = BoxPaths::new(&home, &record.id);
    std::fs::create_dir_all(&paths.sock_dir)
        .map_err(|e| format!("cannot create socket dir: {e}"))?;
    paths.remove_sockets();
    std::fs::create_dir_all(&paths.sock_dir)
        .map_err(|e| format!("cannot create socket dir: {e}"))?;

    // Recorded before any volume lease is taken: a lease whose Box is not live is stale.
    BoxRecord::mark_starting(&db, &record.id, std::process::id())
        .map_err(|e| format!("cannot record the starting state: {e}"))?;

    let assets = GuestAssets::locate().map_err(|e| e.to_string())?;
    let mut prepared = setup::prepare(&home, &record, &paths, args.accel, assets)?;
    let engine = QemuEngine::default();
    let _ = std::fs::remove_file(paths.console_log());
    let vmm_log_start = std::fs::metadata(paths.vmm_log())
        .map(|m| m.len())
        .unwrap_or(0);
    let mut vmm = engine.spawn(&prepared.vm).map_err(|e| e.to_string())?;
    let vmm_pid = vmm.id();
    info!(box_id = %record.id, vmm_pid, accel = %args.accel, "guest launched");

    let booted = connect_and_setup(&paths, &prepared.guest, &mut vmm);
    let (agent, ip) = match booted {
        Ok(v) => v,
        Err(e) => {
            let e = match vmm_exit_error(&paths, &mut vmm, vmm_log_start) {
                Some(vmm_error) => vmm_error,
                None => e,
            };
            let _ = vmm.kill();
            let _ = vmm.wait();
            let console = console_tail(&paths);
            let _ = BoxRecord::mark_exited(&db, &record.id, &format!("boot failed: {e}"), None);
            paths.remove_sockets();
            return Err(format!("boot failed: {e}{console}"));
        }
    };
    info!(box_id = %record.id, ip = ?ip, "agent ready");

    let listener = UnixListener::bind(paths.control_socket())
        .map_err(|e| format!("cannot bind {}: {e}", paths.control_socket().display()))?;
    BoxRecord::mark_running(&db, &record.id, std::process::id(), vmm_pid)
        .map_err(|e| format!("cannot record running state: {e}"))?;
    if let Some(mut r) = ready.take() {
        let _ = writeln!(r, "ok");
    }

    let router = router::Router::new(
        agent,
        &record,
        &paths,
        vmm_pid,
        args.attach,
        prepared.network.clone(),
    )
    .map_err(|e| format!("cannot start router: {e}"))?;
    router.spawn_agent_reader();
    router.spawn_listener(listener);
    router.start_main_unless_attaching();

    let status = vmm
        .wait()
        .map_err(|e| format!("waiting for the VMM: {e}"))?;
    let (reason, code) = router.outcome(status);
    info!(box_id = %record.id, %reason, "guest stopped");
    prepared.teardown();
    router.close_clients();
    paths.remove_sockets();
    let _ = std::fs::remove_file(paths.network_file());
    if record.config.auto_remove {
        let _ = std::fs::remove_dir_all(&paths.dir);
        let _ = BoxRecord::delete(&db, &record.id);
    } else {
        BoxRecord::mark_exited(&db, &record.id, &reason, code)
            .map_err(|e| format!("cannot record exit: {e}"))?;
    }
    Ok(())
}

/// Connects to the agent's port, sends the setup and waits for `Ready`.
fn connect_and_setup(
    paths: &BoxPaths,
    setup: &boxlite_protocol::GuestSetup,
    vmm: &mut std::process::Child,
) -> Result<(UnixStream, Option<String>), String> {
    let started = Instant::now();
    let mut stream = loop {
        if let Ok(Some(status)) = vmm.try_wait() {
            return Err(format!("the VMM exited at once ({status})"));
        }
        match UnixStream::connect(paths.agent_socket()) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("cannot reach the agent socket: {e}")),
        }
    };
    write_frame(
        &mut stream,
        &Frame::control(BOX_CHANNEL, &Control::Setup(Box::new(setup.clone()))),
    )
    .map_err(|e| format!("cannot send setup to the agent: {e}"))?;
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    loop {
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "the agent did not become ready within {READY_TIMEOUT:?}"
            ));
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            return Err(format!("the guest stopped during boot ({status})"));
        }
        if !readable(&reader, Duration::from_millis(200)) {
            continue;
        }
        match read_frame(&mut reader) {
            Ok(Some(frame)) if frame.channel == BOX_CHANNEL => match frame.parse_control() {
                Ok(Control::Ready { version, ip }) => {
                    if version != PROTOCOL_VERSION {
                        warn!(version, "agent speaks another protocol revision");
                    }
                    return Ok((stream, ip));
                }
                Ok(Control::Error { message }) => {
                    return Err(format!("guest setup failed: {message}"))
                }
                Ok(other) => warn!(?other, "unexpected message during boot"),
                Err(e) => return Err(format!("bad message from the agent: {e}")),
            },
            Ok(Some(_)) => {}
            Ok(None) => return Err("the agent closed its port during boot".into()),
            Err(e) => return Err(format!("reading from the agent: {e}")),
        }
    }
}

/// When the VMM failed by itself (now or within a moment; a guest that powers off exits
/// cleanly and keeps the agent's reason), what it said: the error lines QEMU
/// wrote to vmm.log during this start. Its reason, not the agent socket's, is what a user needs.
fn vmm_exit_error(
    paths: &BoxPaths,
    vmm: &mut std::process::Child,
    log_start: u64,
) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let status = loop {
        match vmm.try_wait() {
            Ok(Some(status)) if status.success() => return None,
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    };
    let log = std::fs::read(paths.vmm_log()).unwrap_or_default();
    let new = String::from_utf8_lossy(log.get(log_start as usize..).unwrap_or_default());
    let lines: Vec<&str> = new
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let said: Vec<&str> = match lines.iter().filter(|l| l.starts_with("qemu")).count() {
        0 => lines.last().into_iter().copied().collect(),
        _ => lines
            .into_iter()
            .filter(|l| l.starts_with("qemu"))
            .collect(),
    };
    Some(if said.is_empty() {
        format!("the VMM exited ({status}) without a message in vmm.log")
    } else {
        format!("the VMM exited ({status}): {}", said.join("; "))
    })
}

/// Waits up to `timeout` for `stream` to have data (or be closed).
fn readable(stream: &UnixStream, timeout: Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        stream.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = nix::poll::PollTimeout::try_from(timeout.as_millis() as i32)
        .unwrap_or(nix::poll::PollTimeout::MAX);
    matches!(nix::poll::poll(&mut fds, ms), Ok(n) if n > 0)
}

/// The last lines of the guest console, for error messages.
fn console_tail(paths: &BoxPaths) -> String {
    let text = std::fs::read_to_string(paths.console_log()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(
            "\nlast console lines ({}):\n{}",
            paths.console_log().display(),
            tail.join("\n")
        )
    }
}
