//! One exec session: a process started for the host on the channel it chose, its stdio streamed
//! as frames, its exit reported last.
//!
//! Threads: the session thread resolves and starts the process and waits for its exit status from
//! the reaper; one thread per output stream reads and forwards, one thread feeds stdin (see
//! `streams`); once the output is drained, `Exited` is sent.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use boxlite_protocol::{Control, ExecRequest, Tag};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::console::log;
use crate::lookup::{find_program, LookupError};
use crate::port::FrameSink;
use crate::reaper::{ExitStatus, Reaper};
use crate::spawn::{self, ProcessSpec, SpawnError, Step};
use crate::streams::{feed_input, pipe, pump_output, set_window_size, Stdio};
use crate::user;

/// Why a session could not start. The message goes to the host in `Control::Error`; the ones
/// about the program follow docker's wording (see `lookup`).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Program(#[from] LookupError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error("working directory {0:?} is not an absolute path")]
    RelativeCwd(String),
    #[error("working directory {0} is not a directory")]
    CwdNotDirectory(String),
    #[error("cannot create working directory {path}: {source}")]
    CreateCwd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("argument, variable or path holds a NUL byte: {0:?}")]
    NulByte(String),
    #[error("cannot set up the session's stdio ({what}): {errno}")]
    Stdio {
        what: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("exec: {program:?}: {}", .errno.desc().to_lowercase())]
    Exec {
        program: String,
        errno: nix::errno::Errno,
    },
    #[error("chdir to working directory {cwd}: {}", .errno.desc().to_lowercase())]
    Chdir {
        cwd: String,
        errno: nix::errno::Errno,
    },
    #[error(transparent)]
    Spawn(SpawnError),
    #[error("cannot report the start to the host: {0}")]
    Report(#[source] std::io::Error),
    #[error("the reaper stopped before the process ended")]
    ReaperGone,
}

/// Stdin traffic from the host.
#[derive(Debug)]
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// What the dispatcher holds of a running session.
#[derive(Debug)]
pub struct Session {
    pub channel: u32,
    input: Sender<Input>,
    handles: Mutex<Handles>,
}

/// What `Signal` and `Resize` act on; they may arrive before the process exists.
#[derive(Debug, Default)]
struct Handles {
    pid: Option<Pid>,
    terminal: Option<Arc<OwnedFd>>,
    /// Signals that arrived before the process started, delivered once it has.
    pending_signals: Vec<Signal>,
    /// A size that arrived before the terminal existed.
    pending_size: Option<(u16, u16)>,
    /// The process was reaped.
    ended: bool,
}

impl Session {
    /// Creates the session handle; `run` is then started on its own thread with the receiver.
    pub fn new(channel: u32) -> (Arc<Session>, Receiver<Input>) {
        let (input, rx) = std::sync::mpsc::channel();
        let session = Session {
            channel,
            input,
            handles: Mutex::default(),
        };
        (Arc::new(session), rx)
    }

    /// Queues stdin bytes or the end of stdin.
    pub fn input(&self, input: Input) {
        let _ = self.input.send(input);
    }

    /// Delivers `signal` to the session's process group.
    pub fn signal(&self, signal: i32) -> Result<(), String> {
        let signal = Signal::try_from(signal).map_err(|_| format!("unknown signal {signal}"))?;
        let mut handles = self.handles();
        match handles.pid {
            _ if handles.ended => {}
            // Group members may have ended already; that is not the host's error.
            Some(pid) => drop(killpg(pid, signal)),
            None => handles.pending_signals.push(signal),
        }
        Ok(())
    }

    /// Sets the terminal size of a tty session.
    pub fn resize(&self, rows: u16, cols: u16) {
        let mut handles = self.handles();
        match &handles.terminal {
            Some(master) => set_window_size(master.as_raw_fd(), rows, cols),
            None => handles.pending_size = Some((rows, cols)),
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Handles> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the session to its end: sends `Started` and the output, and returns the message that
    /// ends the channel (`Exited`, or `Error` when the process could not start). The caller sends
    /// it once the channel is free for reuse.
    pub fn run(
        &self,
        req: &ExecRequest,
        input: Receiver<Input>,
        sink: &Arc<FrameSink>,
        reaper: &Reaper,
    ) -> Control {
        match self.start_and_wait(req, input, sink, reaper) {
            Ok(ExitStatus::Code(code)) => Control::Exited {
                code: Some(code),
                signal: None,
            },
            Ok(ExitStatus::Signal(sig)) => Control::Exited {
                code: None,
                signal: Some(sig),
            },
            Err(e) => {
                let message = e.to_string();
                log!("exec on channel {} failed: {message}", self.channel);
                Control::Error { message }
            }
        }
    }

    fn start_and_wait(
        &self,
        req: &ExecRequest,
        input: Receiver<Input>,
        sink: &Arc<FrameSink>,
        reaper: &Reaper,
    ) -> Result<ExitStatus, ExecError> {
        let channel = self.channel;
        let program = req.argv.first().cloned().unwrap_or_default();
        let user = user::resolve(&req.user, Path::new("/etc"))?;
        let path = find_program(&program, &req.env)?;
        let cwd = prepare_cwd(&req.cwd)?;
        let mut env = req.env.clone();
        if !env.iter().any(|kv| kv.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home));
        }

        let stdio = Stdio::new(req)?;
        if let Some(master) = &stdio.terminal {
            let mut handles = self.handles();
            if let Some((rows, cols)) = handles.pending_size.take() {
                set_window_size(master.as_raw_fd(), rows, cols);
            }
            handles.terminal = Some(Arc::clone(master));
        }
        let spec = ProcessSpec {
            path: cstring(path.as_os_str().as_bytes())?,
            argv: req
                .argv
                .iter()
                .map(|a| cstring(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            env: env
                .iter()
                .map(|a| cstring(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            cwd: cstring(cwd.as_bytes())?,
            ids: user.ids,
            stdio: stdio.child_fds(),
            controlling_tty: req.tty,
        };
        let (pid, exit) = reaper
            .spawn_with(|| spawn::spawn(&spec))
            .map_err(|e| spawn_error(&program, &cwd, e))?;
        let Stdio {
            child,
            stdin,
            stdout,
            stderr,
            terminal: _,
        } = stdio;
        drop(child);
        {
            let mut handles = self.handles();
            handles.pid = Some(pid);
            for signal in handles.pending_signals.drain(..) {
                let _ = killpg(pid, signal);
            }
        }
        sink.control(
            channel,
            &Control::Started {
                pid: pid.as_raw() as u32,
            },
        )
        .map_err(ExecError::Report)?;

        // Closing `ended` tells the pumps the process is gone.
        let (exit_notice, ended) = pipe()?;
        let exit_notice = Arc::new(exit_notice);
        let mut pumps = Vec::new();
        for (fd, tag) in [(stdout, Tag::Stdout), (stderr, Tag::Stderr)] {
            let Some(fd) = fd else { continue };
            let (sink, exited) = (Arc::clone(sink), Arc::clone(&exit_notice));
            pumps.push(thread::spawn(move || {
                pump_output(&fd, channel, tag, &sink, &exited)
            }));
        }
        if let Some(fd) = stdin {
            let tty = req.tty;
            thread::spawn(move || feed_input(fd, input, tty));
        }

        let status = exit.recv().map_err(|_| ExecError::ReaperGone)?;
        // Signals for this channel must not reach a later process that reuses the pid.
        self.handles().ended = true;
        drop(ended);
        for pump in pumps {
            let _ = pump.join();
        }
        self.handles().terminal = None;
        Ok(status)
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, ExecError> {
    CString::new(bytes).map_err(|_| ExecError::NulByte(String::from_utf8_lossy(bytes).into()))
}

/// Creates the working directory if missing (as docker does); refuses a non-directory.
fn prepare_cwd(cwd: &str) -> Result<String, ExecError> {
    let cwd = if cwd.is_empty() { "/" } else { cwd };
    if !cwd.starts_with('/') {
        return Err(ExecError::RelativeCwd(cwd.into()));
    }
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(cwd.to_string()),
        Ok(_) => Err(ExecError::CwdNotDirectory(cwd.into())),
        Err(_) => std::fs::create_dir_all(cwd)
            .map(|()| cwd.to_string())
            .map_err(|source| ExecError::CreateCwd {
                path: cwd.into(),
                source,
            }),
    }
}

fn spawn_error(program: &str, cwd: &str, e: SpawnError) -> ExecError {
    match e {
        SpawnError::Child {
            step: Step::Exec,
            errno,
        } => ExecError::Exec {
            program: program.into(),
            errno,
        },
        SpawnError::Child {
            step: Step::Chdir,
            errno,
        } => ExecError::Chdir {
            cwd: cwd.into(),
            errno,
        },
        other => ExecError::Spawn(other),
    }
}
