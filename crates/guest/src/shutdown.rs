//! Clean power-off of the Box: every process asked to stop (SIGTERM), then killed (SIGKILL),
//! data synced, every mount unmounted (or at least made read-only), then `reboot(RB_POWER_OFF)`,
//! which makes QEMU exit.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::console::log;

/// How long processes get to exit after SIGTERM when the host does not say (the main process
/// ended, or an older host).
pub const GRACE: Duration = Duration::from_secs(3);

/// Stops everything and powers the VM off: processes get `grace` to exit after SIGTERM (a
/// `boxlite stop -t`). `sessions_reported` is called once every process is gone and waits
/// (briefly) until the sessions have told the host how their processes ended. Never returns.
pub fn power_off(grace: Duration, sessions_reported: impl FnOnce()) -> ! {
    log!("shutting down");
    stop_processes(grace);
    sessions_reported();
    nix::unistd::sync();
    unmount_all();
    nix::unistd::sync();
    log!("power off");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn stop_processes(grace: Duration) {
    // From PID 1, pid -1 means every process but PID 1 itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if !wait_for_no_processes(grace) {
        log!("processes still running after {grace:?}; killing them");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        wait_for_no_processes(Duration::from_secs(2));
    }
}

/// Waits until no user process other than PID 1 is left (zombies are the reaper's).
fn wait_for_no_processes(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while user_processes() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

fn user_processes() -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 2)
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name: state, ppid.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let ppid = fields.next().unwrap_or("2");
            state != "Z" && state != "X" && ppid != "2" && ppid != "0"
        })
        .count()
}

/// Unmounts every mount, deepest first; what cannot be unmounted is made read-only; `/` last.
fn unmount_all() {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect();
    targets.reverse();
    for target in targets.iter().filter(|t| t.as_str() != "/") {
        if umount2(target.as_str(), MntFlags::empty()).is_err() {
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            let _ = mount(
                None::<&str>,
                target.as_str(),
                None::<&str>,
                ro,
                None::<&str>,
            );
            let _ = umount2(target.as_str(), MntFlags::MNT_DETACH);
        }
    }
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, ro, None::<&str>) {
        log!("remounting / read-only failed: {e}");
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
