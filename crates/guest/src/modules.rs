//! Loads the kernel modules packed into the initramfs by `scripts/build-assets.sh`.
//!
//! `/boxlite/modules.dep` has one line per module the agent may need, `NAME: FILE.ko … NAME.ko`,
//! dependencies first as `modprobe --show-depends` resolved them at build time. The agent loads the
//! virtio transport, console and block drivers at boot and the rest only when a Box asks for them
//! (its filesystems, virtiofs, a NIC): ext4 alone costs ~0.2 s under TCG, and modules no Box uses
//! are never loaded. Every file is opened at boot, so loading still works after the switch into
//! the Box's root, where the initramfs is out of reach.
//!
//! A module that is already present (built in, or loaded) is fine; one that refuses the hardware
//! (`ENODEV`, e.g. crc32c-intel on a CPU without SSE4.2) is skipped; any other failure is logged and
//! the boot goes on, since a missing driver shows up later as a missing device or filesystem with a
//! clear name.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;

use crate::console::log;

/// The modules every Box needs before it can talk to the host and find its disks.
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_console", "virtio_blk"];

/// The packed modules: open files by file name and load lists by module name.
#[derive(Debug, Default)]
struct Catalog {
    files: HashMap<String, File>,
    load_lists: HashMap<String, Vec<String>>,
    loaded: HashSet<String>,
}

static CATALOG: OnceLock<Mutex<Catalog>> = OnceLock::new();

/// Reads `dir/modules.dep` and opens every module file it names.
pub fn open_catalog(dir: &Path) {
    let mut catalog = Catalog::default();
    match fs::read_to_string(dir.join("modules.dep")) {
        Ok(text) => {
            for line in text.lines() {
                let Some((name, files)) = line.split_once(':') else {
                    continue;
                };
                let files: Vec<String> = files.split_whitespace().map(String::from).collect();
                for file in &files {
                    if catalog.files.contains_key(file) {
                        continue;
                    }
                    match File::open(dir.join("modules").join(file)) {
                        Ok(f) => drop(catalog.files.insert(file.clone(), f)),
                        Err(e) => log!("module file {file}: {e}"),
                    }
                }
                catalog.load_lists.insert(name.trim().to_string(), files);
            }
        }
        Err(e) => log!("no module list in {}: {e}", dir.display()),
    }
    let _ = CATALOG.set(Mutex::new(catalog));
}

/// Loads module `name` and its dependencies unless already loaded. A name the catalog does not
/// know is taken to be built into the kernel (tmpfs, proc…) and ignored.
pub fn ensure(name: &str) {
    let Some(catalog) = CATALOG.get() else {
        return;
    };
    let mut catalog = catalog.lock().unwrap_or_else(|e| e.into_inner());
    let Some(files) = catalog.load_lists.get(name).cloned() else {
        return;
    };
    for file in files {
        if catalog.loaded.contains(&file) {
            continue;
        }
        let result = match catalog.files.get(&file) {
            Some(f) => load(f),
            None => Err(Errno::ENOENT),
        };
        match result {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(Errno::ENODEV) => log!("module {file}: no matching hardware, skipped"),
            Err(e) => log!("module {file}: load failed: {e}"),
        }
        catalog.loaded.insert(file);
    }
}

/// The module that provides filesystem type `fstype` (ext2/ext3 are served by ext4).
pub fn for_filesystem(fstype: &str) -> &str {
    match fstype {
        "ext2" | "ext3" | "" => "ext4",
        other => other,
    }
}

fn load(file: &File) -> Result<(), Errno> {
    let params: &CStr = c"";
    // SAFETY: finit_module reads the module from a valid open descriptor and a NUL-terminated
    // parameter string; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}
