//! Loads the kernel modules packed into the initramfs by `scripts/build-assets.sh`.
//!
//! `/boxlite/modules.order` lists the module files (in `/boxlite/modules/`) dependencies first, as
//! `modprobe --show-depends` resolved them at build time. Each is loaded with `finit_module(2)`.
//! A module that is already present (built in, or loaded) is fine; one that refuses the hardware
//! (`ENODEV`, e.g. crc32c-intel without SSE4.2 under TCG) is skipped; any other failure is logged and
//! the boot goes on, since a missing driver shows up later as a missing device with a clear name.

use std::ffi::CStr;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::console::log;

/// Loads every module listed in `dir/modules.order`; returns how many were inserted.
pub fn load_all(dir: &Path) -> usize {
    let order = match fs::read_to_string(dir.join("modules.order")) {
        Ok(order) => order,
        Err(e) => {
            log!("no module list in {}: {e}", dir.display());
            return 0;
        }
    };
    let mut loaded = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join("modules").join(name);
        match load(&path) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(nix::errno::Errno::ENODEV) => log!("module {name}: no matching hardware, skipped"),
            Err(e) => log!("module {name}: load failed: {e}"),
        }
    }
    loaded
}

fn load(path: &Path) -> Result<(), nix::errno::Errno> {
    let file = File::open(path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)))?;
    let params: &CStr = c"";
    // SAFETY: finit_module reads the module from a valid open descriptor and a NUL-terminated
    // parameter string; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}
