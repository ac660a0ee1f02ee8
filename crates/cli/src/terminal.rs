//! The CLI's terminal duties for an attached session: raw mode for `-t`, forwarding signals
//! (Ctrl-C reaches the process in the Box) and window-size changes.

use std::os::fd::AsFd;

use boxlite::litebox::SessionControl;
use nix::sys::termios::{self, SetArg, Termios};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::{Handle, Signals};

/// The terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Rows and columns of the controlling terminal.
pub fn size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the session's process and SIGWINCH as a resize,
/// until the returned guard is dropped. With a tty, Ctrl-C arrives as a byte instead.
pub struct SignalForwarder {
    handle: Handle,
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

pub fn forward_signals(control: SessionControl, _tty: bool) -> Option<SignalForwarder> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]).ok()?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGWINCH {
                if let Some((rows, cols)) = size() {
                    let _ = control.resize(rows, cols);
                }
            } else {
                let _ = control.signal(sig);
            }
        }
    });
    Some(SignalForwarder { handle })
}
