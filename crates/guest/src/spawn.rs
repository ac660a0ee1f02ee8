//! Starting a process: fork, then in the child only async-signal-safe system calls (no allocation,
//! since other threads may hold the allocator's lock at fork time), then execve.
//!
//! Everything the child needs (C strings, pointer arrays) is built before the fork. If a step in
//! the child fails, it writes the step and errno to a close-on-exec pipe and exits with 127; the
//! parent reads that pipe, so a successful exec shows as an empty read.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;

use nix::unistd::Pid;

/// User and groups the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A fully resolved process to start.
#[derive(Debug)]
pub struct ProcessSpec {
    /// The executable, already looked up in PATH.
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    pub ids: Ids,
    /// Descriptors that become the child's 0, 1 and 2 (all above 2 in the parent).
    pub stdio: [RawFd; 3],
    /// Make descriptor 0 the controlling terminal of the child's new session.
    pub controlling_tty: bool,
}

/// The step in the child that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Setsid,
    Stdio,
    ControllingTty,
    Groups,
    Gid,
    Uid,
    Chdir,
    Exec,
}

impl Step {
    fn from_u32(v: u32) -> Step {
        [
            Step::Setsid,
            Step::Stdio,
            Step::ControllingTty,
            Step::Groups,
            Step::Gid,
            Step::Uid,
            Step::Chdir,
            Step::Exec,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Step::Exec)
    }
}

/// Why a process did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the exec status pipe: {0}")]
    Pipe(#[source] nix::Error),
    #[error("fork failed: {0}")]
    Fork(#[source] nix::Error),
    #[error("{step:?} failed in the new process: {errno}")]
    Child {
        step: Step,
        errno: nix::errno::Errno,
    },
}

/// Forks and execs `spec`; returns the child's pid once execve succeeded.
pub fn spawn(spec: &ProcessSpec) -> Result<Pid, SpawnError> {
    let argv: Vec<*const libc::c_char> = spec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = spec
        .env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect();
    let (status_read, status_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;

    // SAFETY: the child runs only `child_exec`, which makes async-signal-safe system calls on
    // memory prepared above and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(SpawnError::Fork(nix::errno::Errno::last())),
        0 => child_exec(spec, &argv, &envp, status_write.as_raw_fd()),
        pid => {
            drop(status_write);
            let mut report = [0u8; 8];
            let mut file = File::from(status_read);
            let mut got = 0;
            while got < report.len() {
                match file.read(&mut report[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if got < report.len() {
                return Ok(Pid::from_raw(pid));
            }
            let step = Step::from_u32(u32::from_ne_bytes(report[..4].try_into().unwrap()));
            let errno = i32::from_ne_bytes(report[4..].try_into().unwrap());
            Err(SpawnError::Child {
                step,
                errno: nix::errno::Errno::from_raw(errno),
            })
        }
    }
}

/// The child's side of [`spawn`]. Must not allocate.
fn child_exec(
    spec: &ProcessSpec,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    status: RawFd,
) -> ! {
    // SAFETY (whole function): plain system calls on descriptors and NUL-terminated strings that
    // the parent prepared and that stay valid in the child's copy of its memory.
    unsafe {
        let fail = |step: Step| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(status, report.as_ptr().cast(), report.len());
            libc::_exit(127);
        };

        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        if libc::setsid() < 0 {
            fail(Step::Setsid);
        }
        for (target, &source) in spec.stdio.iter().enumerate() {
            if libc::dup2(source, target as RawFd) < 0 {
                fail(Step::Stdio);
            }
        }
        if spec.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(Step::ControllingTty);
        }
        if libc::setgroups(spec.ids.groups.len(), spec.ids.groups.as_ptr()) < 0 {
            fail(Step::Groups);
        }
        if libc::setgid(spec.ids.gid) < 0 {
            fail(Step::Gid);
        }
        if libc::setuid(spec.ids.uid) < 0 {
            fail(Step::Uid);
        }
        if libc::chdir(spec.cwd.as_ptr()) < 0 {
            fail(Step::Chdir);
        }
        libc::execve(spec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(Step::Exec)
    }
}

/// Opens /dev/null for a child's stdin.
pub fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};

    fn spec(path: &str, argv: &[&str], cwd: &str, out: RawFd) -> ProcessSpec {
        let c = |s: &str| CString::new(s).unwrap();
        ProcessSpec {
            path: c(path),
            argv: argv.iter().map(|a| c(a)).collect(),
            env: vec![c("ONLY=this")],
            cwd: c(cwd),
            ids: Ids {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                groups: vec![nix::unistd::getgid().as_raw()],
            },
            stdio: [out, out, out],
            controlling_tty: false,
        }
    }

    #[test]
    fn runs_the_program_with_exactly_the_given_environment_and_cwd() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let spec = spec("/bin/sh", &["sh", "-c", "pwd; env"], "/tmp", w.as_raw_fd());
        let pid = match spawn(&spec) {
            Ok(pid) => pid,
            // setgroups needs root (the agent always is); anyone else gets that step reported.
            Err(SpawnError::Child {
                step: Step::Groups, ..
            }) if !nix::unistd::getuid().is_root() => return,
            Err(e) => panic!("spawning /bin/sh: {e}"),
        };
        drop(w);
        assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 0));
        let mut out = String::new();
        File::from(r).read_to_string(&mut out).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("PWD=")).collect();
        assert!(
            lines.contains(&"/tmp") && lines.contains(&"ONLY=this"),
            "{out}"
        );
        assert!(
            !out.contains("PATH="),
            "nothing is added to the environment: {out}"
        );
    }

    #[test]
    fn a_failing_step_in_the_child_is_reported_with_its_errno() {
        let null = dev_null().unwrap();
        let missing = spec("/no/such/program", &["x"], "/", null.as_raw_fd());
        match spawn(&missing) {
            Err(SpawnError::Child { step, errno }) => {
                if nix::unistd::getuid().is_root() {
                    assert_eq!((step, errno), (Step::Exec, nix::errno::Errno::ENOENT));
                } else {
                    assert_eq!(step, Step::Groups);
                }
            }
            other => panic!("expected a child error, got {other:?}"),
        }
        if nix::unistd::getuid().is_root() {
            let bad_cwd = spec("/bin/true", &["true"], "/no/such/dir", null.as_raw_fd());
            assert!(matches!(
                spawn(&bad_cwd),
                Err(SpawnError::Child {
                    step: Step::Chdir,
                    errno: nix::errno::Errno::ENOENT
                })
            ));
        }
    }
}
