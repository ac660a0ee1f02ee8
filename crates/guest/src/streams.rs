//! The byte plumbing of an exec session: pipes, or a pseudo-terminal, between the process and
//! the agent; pumps that forward output as frames; a feeder that writes the host's stdin.
//!
//! After the process ends, output is drained until end of file, or until the stream has stayed
//! idle for [`LINGER`] (a background child may keep the pipe open forever).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxlite_protocol::{ExecRequest, Tag, MAX_BODY};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};

use crate::port::FrameSink;
use crate::session::{ExecError, Input};
use crate::spawn;

/// How long output may stay idle after the process ended before the session stops waiting for
/// end of file.
pub const LINGER: Duration = Duration::from_millis(250);

/// The descriptors of a session: the child's ends and the agent's ends.
#[derive(Debug)]
pub struct Stdio {
    /// The child's 0, 1, 2 (closed in the agent once the child started).
    pub child: [Arc<OwnedFd>; 3],
    pub stdin: Option<Arc<OwnedFd>>,
    pub stdout: Option<Arc<OwnedFd>>,
    pub stderr: Option<Arc<OwnedFd>>,
    pub terminal: Option<Arc<OwnedFd>>,
}

impl Stdio {
    pub fn new(req: &ExecRequest) -> Result<Stdio, ExecError> {
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

    pub fn child_fds(&self) -> [i32; 3] {
        [
            self.child[0].as_raw_fd(),
            self.child[1].as_raw_fd(),
            self.child[2].as_raw_fd(),
        ]
    }
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
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

pub fn set_window_size(fd: i32, rows: u16, cols: u16) {
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
pub fn pump_output(fd: &OwnedFd, channel: u32, tag: Tag, sink: &FrameSink, exit_notice: &OwnedFd) {
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
pub fn feed_input(fd: Arc<OwnedFd>, input: Receiver<Input>, tty: bool) {
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};
    use std::thread;

    use boxlite_protocol::read_frame;

    use super::*;

    /// Runs a pump over data written to a pipe, into a sink backed by a temporary file; checks
    /// that the frames carry exactly that data and returns how long the pump went on after the
    /// process was reported gone.
    fn pump_frames(keep_writer_open: bool) -> Duration {
        let (out_r, out_w) = pipe().unwrap();
        let (notice_r, notice_w) = pipe().unwrap();
        let sink_file = tempfile::tempfile().unwrap();
        let sink = Arc::new(FrameSink::new(sink_file.try_clone().unwrap()));
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();

        let pump = {
            let sink = Arc::clone(&sink);
            thread::spawn(move || pump_output(&out_r, 9, Tag::Stderr, &sink, &notice_r))
        };
        let mut writer = File::from(out_w);
        writer.write_all(&data).unwrap();
        let held = keep_writer_open.then_some(writer);
        let exited = Instant::now();
        drop(notice_w);
        pump.join().unwrap();
        let took = exited.elapsed();
        drop(held);

        let mut file = sink_file;
        file.rewind().unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        let mut reader = &bytes[..];
        let mut got = Vec::new();
        while let Some(frame) = read_frame(&mut reader).unwrap() {
            assert_eq!((frame.channel, frame.tag), (9, Tag::Stderr));
            assert!(frame.body.len() <= MAX_BODY);
            got.extend_from_slice(&frame.body);
        }
        assert_eq!(got, data, "every byte arrives, in order");
        took
    }

    #[test]
    fn output_is_forwarded_whole_until_end_of_file() {
        let took = pump_frames(false);
        assert!(
            took < LINGER,
            "end of file ends the pump at once ({took:?})"
        );
    }

    #[test]
    fn a_pipe_held_open_after_exit_ends_the_pump_after_the_linger() {
        let took = pump_frames(true);
        assert!(took >= LINGER && took < LINGER * 8, "{took:?}");
    }
}
