//! PID 1's reaper: one thread collects every child that ends and hands each exit status to whoever
//! is waiting for that pid (an exec session, a helper like mke2fs); orphans re-parented to PID 1
//! are simply reaped.
//!
//! SIGCHLD is blocked in every thread (the mask is set before the first thread starts, and threads
//! inherit it) and the reaper waits for it with `sigwait`, then drains with `waitpid(-1, WNOHANG)`.
//! A process is registered under the same lock that the reaper takes before dispatching, and the
//! lock is held from fork to registration, so even a child that ends at once is never mistaken for
//! an orphan.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The shell's view: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(sig) => 128 + sig,
        }
    }
}

/// Waiters by pid.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, Sender<ExitStatus>>>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Blocks SIGCHLD in the calling thread; call from `main` before any thread is started.
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Starts the reaper thread (once) and returns the registry.
pub fn start() -> &'static Reaper {
    let mut started = false;
    let reaper = REAPER.get_or_init(|| {
        started = true;
        Reaper::default()
    });
    if started {
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.run())
            .expect("spawning the reaper thread");
    }
    reaper
}

impl Reaper {
    /// Runs `spawn` (which forks and returns the child's pid) with the registry locked, and
    /// registers the child; the receiver yields its exit status.
    pub fn spawn_with<E>(
        &self,
        spawn: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, Receiver<ExitStatus>), E> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let pid = spawn()?;
        let (tx, rx) = channel();
        waiting.insert(pid.as_raw(), tx);
        Ok((pid, rx))
    }

    fn run(&self) {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            let _ = set.wait();
            self.reap_ready();
        }
    }

    fn reap_ready(&self) {
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return,
            };
            let waiter = self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pid.as_raw());
            if let Some(waiter) = waiter {
                let _ = waiter.send(status);
            }
        }
    }
}
