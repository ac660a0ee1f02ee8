//! An exec session as the caller sees it: a process in the Box whose stdin the caller feeds and
//! whose output and exit status it receives, over the Box's control socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use boxlite_protocol::{read_frame, write_frame, Control, Frame, Tag, MAX_BODY};

/// The channel a session uses on its own connection.
const SESSION_CHANNEL: u32 = 1;

/// How a process in the Box ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + the signal that killed the process.
    pub fn code(&self) -> i32 {
        self.code.unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What a finished session produced, for callers that collect output in memory.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What a session ended with.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The agent could not start the process (missing command, unknown user, bad directory).
    #[error("{message}")]
    Failed { message: String, exit_code: i32 },
    #[error("connection to the box lost")]
    Io(#[from] io::Error),
}

/// Sends stdin, signals and terminal sizes to a session; cheap to clone and usable from other
/// threads while [`ExecSession::wait`] runs.
#[derive(Debug, Clone)]
pub struct SessionControl {
    writer: Arc<Mutex<UnixStream>>,
}

impl SessionControl {
    fn send(&self, frame: &Frame) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap();
        write_frame(&mut *w, frame)
    }
    /// Delivers `signal` to the session's process group.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        self.send(&Frame::control(
            SESSION_CHANNEL,
            &Control::Signal { signal },
        ))
    }
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        self.send(&Frame::control(
            SESSION_CHANNEL,
            &Control::Resize { rows, cols },
        ))
    }
    /// Sends stdin bytes.
    pub fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(MAX_BODY) {
            self.send(&Frame::data(SESSION_CHANNEL, Tag::Stdin, chunk.to_vec()))?;
        }
        Ok(())
    }
    pub fn close_stdin(&self) -> io::Result<()> {
        self.send(&Frame::control(SESSION_CHANNEL, &Control::StdinEof))
    }
    /// Copies `input` to the session's stdin until its end, then closes stdin.
    pub fn pump_stdin(&self, mut input: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.write_stdin(&buf[..n])?;
        }
        self.close_stdin()
    }
}

/// Sends one Box-level request to the shim at `socket` and reads its one answer.
pub(crate) fn query(socket: &std::path::Path, request: &Control) -> io::Result<Control> {
    let mut stream = UnixStream::connect(socket)?;
    write_frame(&mut stream, &Frame::control(SESSION_CHANNEL, request))?;
    match read_frame(&mut stream)? {
        Some(frame) => Ok(frame.parse_control()?),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the shim closed the connection",
        )),
    }
}

/// A running process in a Box.
#[derive(Debug)]
pub struct ExecSession {
    reader: UnixStream,
    control: SessionControl,
}

impl ExecSession {
    /// Opens a session by sending `request` (an `Exec` or `Attach`) on a new connection.
    pub(crate) fn open(socket: &std::path::Path, request: Control) -> io::Result<ExecSession> {
        let stream = UnixStream::connect(socket)?;
        let reader = stream.try_clone()?;
        let control = SessionControl {
            writer: Arc::new(Mutex::new(stream)),
        };
        control.send(&Frame::control(SESSION_CHANNEL, &request))?;
        Ok(ExecSession { reader, control })
    }

    pub fn control(&self) -> SessionControl {
        self.control.clone()
    }

    /// Streams the process's output into `stdout` and `stderr` until it exits.
    pub fn wait(
        mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ExecError> {
        loop {
            let Some(frame) = read_frame(&mut self.reader)? else {
                return Err(ExecError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the box stopped before the process reported its exit",
                )));
            };
            match frame.tag {
                Tag::Stdout => {
                    stdout.write_all(&frame.body)?;
                    stdout.flush()?;
                }
                Tag::Stderr => {
                    stderr.write_all(&frame.body)?;
                    stderr.flush()?;
                }
                Tag::Stdin => {}
                Tag::Control => match frame.parse_control()? {
                    Control::Exited { code, signal } => return Ok(ExitStatus { code, signal }),
                    Control::Error { message } => {
                        let exit_code = crate::shim::exit_code_for_exec_error(&message);
                        return Err(ExecError::Failed { message, exit_code });
                    }
                    _ => {}
                },
            }
        }
    }

    /// Waits and collects the output in memory.
    pub fn output(self) -> Result<Output, ExecError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = self.wait(&mut out, &mut err)?;
        Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    }
}
