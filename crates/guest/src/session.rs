//! One exec session: a process started for the host on the channel it chose, its stdio streamed
//! as frames, its exit reported last.
//!
//! Threads: the session thread resolves and starts the process and waits for its exit status from
//! the reaper; one thread per output stream reads and forwards; one thread feeds stdin. After the
//! process ends, output is drained until end of file, or until the stream has stayed idle for
//! [`LINGER`] (a background child may keep the pipe open forever); only then is `Exited` sent.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use boxlite_protocol::{Control, ExecRequest, Tag, MAX_BODY};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::console::log;
use crate::lookup::{find_program, LookupError};
use crate::port::FrameSink;
use crate::reaper::{ExitStatus, Reaper};
use crate::spawn::{self, ProcessSpec, SpawnError, Step};
use crate::user;

/// How long output may stay idle after the process ended before the session stops waiting for
/// end of file.
pub const LINGER: Duration = Duration::from_millis(250);

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

    /// Runs the session to its end; sends `Started`, the output, then `Exited` (or `Error`).
    pub fn run(
        &self,
        req: &ExecRequest,
        input: Receiver<Input>,
        sink: &Arc<FrameSink>,
        reaper: &Reaper,
    ) {
        let channel = self.channel;
        let outcome = self.start_and_wait(req, input, sink, reaper);
        let msg = match outcome {
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
                log!("exec on channel {channel} failed: {message}");
                Control::Error { message }
            }
        };
        if let Err(e) = sink.control(channel, &msg) {
            log!("channel {channel}: cannot report the end of the session: {e}");
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

/// The descriptors of a session: the child's ends and the agent's ends.
struct Stdio {
    /// The child's 0, 1, 2 (closed in the agent once the child started).
    child: [Arc<OwnedFd>; 3],
    stdin: Option<Arc<OwnedFd>>,
    stdout: Option<Arc<OwnedFd>>,
    stderr: Option<Arc<OwnedFd>>,
    terminal: Option<Arc<OwnedFd>>,
}

impl Stdio {
    fn new(req: &ExecRequest) -> Result<Stdio, ExecError> {
        if req.tty {
            let size = Winsize {
                ws_row: if req.rows == 0 { 24 } else { req.rows },
                ws_col: if req.cols == 0 { 80 } else { req.cols },
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = openpty(Some(&size), None).map_err(|errno| ExecError::Stdio {
                what: "openpty",
                errno,
            })?;
            cloexec(&pty.master)?;
            cloexec(&pty.slave)?;
            let master = Arc::new(pty.master);
            let slave = Arc::new(pty.slave);
            return Ok(Stdio {
                child: [slave.clone(), slave.clone(), slave],
                stdin: req.stdin.then(|| master.clone()),
                stdout: Some(master.clone()),
                stderr: None,
                terminal: Some(master),
            });
        }
        let (stdin_child, stdin) = if req.stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null = spawn::dev_null().map_err(|e| ExecError::Stdio {
                what: "/dev/null",
                errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            (null, None)
        };
        let (stdout, stdout_child) = pipe()?;
        let (stderr, stderr_child) = pipe()?;
        Ok(Stdio {
            child: [
                Arc::new(stdin_child),
                Arc::new(stdout_child),
                Arc::new(stderr_child),
            ],
            stdin: stdin.map(Arc::new),
            stdout: Some(Arc::new(stdout)),
            stderr: Some(Arc::new(stderr)),
            terminal: None,
        })
    }

    fn child_fds(&self) -> [i32; 3] {
        [
            self.child[0].as_raw_fd(),
            self.child[1].as_raw_fd(),
            self.child[2].as_raw_fd(),
        ]
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| ExecError::Stdio {
        what: "pipe",
        errno,
    })?;
    // A larger pipe means fewer wake-ups for bulk output; the default size is fine if refused.
    let _ = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok((r, w))
}

fn cloexec(fd: &OwnedFd) -> Result<(), ExecError> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(|errno| ExecError::Stdio {
            what: "close-on-exec",
            errno,
        })
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

fn set_window_size(fd: i32, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; fd is the terminal's master.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) };
}

/// Forwards one output stream until end of file, or until it has stayed idle for [`LINGER`]
/// after the process ended (`exit_notice` reports a hang-up then).
fn pump_output(fd: &OwnedFd, channel: u32, tag: Tag, sink: &FrameSink, exit_notice: &OwnedFd) {
    let mut buf = vec![0u8; MAX_BODY];
    // Since when the stream is idle after the process ended.
    let mut idle_since: Option<Instant> = None;
    loop {
        let readable = match idle_since {
            None => {
                let mut fds = [
                    PollFd::new(fd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(exit_notice.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
                if fds[1].any().unwrap_or(false) {
                    idle_since = Some(Instant::now());
                }
                fds[0].any().unwrap_or(false)
            }
            Some(since) => {
                let left = LINGER.saturating_sub(since.elapsed());
                if left.is_zero() {
                    return;
                }
                let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(millis)) {
                    Ok(n) => n > 0,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            }
        };
        if !readable {
            continue;
        }
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            // EIO: the terminal's last slave descriptor closed.
            Ok(0) | Err(nix::errno::Errno::EIO) => return,
            Ok(n) => {
                if idle_since.is_some() {
                    idle_since = Some(Instant::now());
                }
                if sink.data(channel, tag, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(_) => return,
        }
    }
}

/// Writes the host's stdin into the process; end of stdin closes the pipe, or sends the
/// terminal's end-of-file character (^D) to a tty.
fn feed_input(fd: Arc<OwnedFd>, input: Receiver<Input>, tty: bool) {
    let mut file = match fd.try_clone() {
        Ok(fd) => File::from(fd),
        Err(_) => return,
    };
    drop(fd);
    while let Ok(msg) = input.recv() {
        match msg {
            Input::Data(bytes) => {
                if file.write_all(&bytes).is_err() {
                    return;
                }
            }
            Input::Eof if tty => {
                let _ = file.write_all(&[4]);
            }
            Input::Eof => return,
        }
    }
}
