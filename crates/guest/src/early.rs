//! The first steps of PID 1: a console on descriptors 0–2, the kernel's pseudo filesystems and the
//! command line switches the agent understands.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Makes sure descriptors 0, 1 and 2 are open on the console, whatever the kernel managed to do.
pub fn ensure_console_fds() {
    // SAFETY: fcntl(F_GETFD) only queries descriptor flags.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    if !missing {
        return;
    }
    let _ = fs::create_dir_all("/dev");
    let _ = mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::empty(),
        None::<&str>,
    );
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
    if let Ok(console) = console {
        for fd in 0..3 {
            // SAFETY: dup2 onto a standard descriptor number; `console` stays valid during the call.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// Mounts one pseudo filesystem at `target` (created if missing); an existing mount is fine.
pub fn mount_pseudo(
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    fs::create_dir_all(target)?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(io::Error::other(format!("mount {fstype} on {target}: {e}"))),
    }
}

/// /proc, /sys and /dev of the initramfs.
pub fn mount_kernel_filesystems() -> io::Result<()> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_pseudo("proc", "/proc", hardened, None)?;
    mount_pseudo("sysfs", "/sys", hardened, None)?;
    mount_pseudo("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    Ok(())
}

/// Whether the kernel command line holds `switch` as a whole word (e.g. `boxlite.probe=1`).
pub fn cmdline_has(switch: &str) -> bool {
    fs::read_to_string(Path::new("/proc/cmdline"))
        .map(|cmdline| cmdline.split_whitespace().any(|word| word == switch))
        .unwrap_or(false)
}
