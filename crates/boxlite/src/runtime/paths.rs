//! Where one Box's files live: `boxes/<id>/` under the home folder, and its unix sockets, which
//! must fit `sun_path` (108 bytes) however deep the home folder is. When `boxes/<id>/` is too deep
//! for that, sockets go to a short per-user folder under the system temp dir instead, named by a
//! hash of the Box folder so two homes never collide.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::home::Home;

/// Longest socket path we create (`sun_path` is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The files of one Box.
#[derive(Debug, Clone)]
pub struct BoxPaths {
    pub dir: PathBuf,
    pub sock_dir: PathBuf,
}

impl BoxPaths {
    pub fn new(home: &Home, id: &str) -> BoxPaths {
        let dir = home.box_dir(id);
        let longest = dir.join("net.sock").as_os_str().len() + 8;
        let sock_dir = if longest <= MAX_SOCKET_PATH {
            dir.clone()
        } else {
            let hash = hex::encode(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..8]);
            let uid = nix::unistd::getuid();
            std::env::temp_dir()
                .join(format!("boxlite-{uid}"))
                .join(hash)
        };
        BoxPaths { dir, sock_dir }
    }

    /// The Box's copy-on-write root disk (QCOW2 over the image's base).
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// Output of the main process when nobody is attached (like `docker logs`).
    pub fn main_log(&self) -> PathBuf {
        self.dir.join("main.log")
    }
    /// The network backend's configuration while the Box runs (ports in effect).
    pub fn network_file(&self) -> PathBuf {
        self.dir.join("network.json")
    }
    /// Serialises lifecycle operations on this Box across processes.
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.sock_dir.join("agent.sock")
    }
    /// Where CLIs reach the shim.
    pub fn control_socket(&self) -> PathBuf {
        self.sock_dir.join("ctl.sock")
    }
    pub fn net_socket(&self) -> PathBuf {
        self.sock_dir.join("net.sock")
    }
    pub fn share_socket(&self, index: usize) -> PathBuf {
        self.sock_dir.join(format!("fs{index}.sock"))
    }

    /// Removes every socket (and the socket folder when it is not the Box folder).
    pub fn remove_sockets(&self) {
        if self.sock_dir != self.dir {
            let _ = std::fs::remove_dir_all(&self.sock_dir);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.sock_dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "sock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// True when `path` would fit `sun_path`.
pub fn fits_sun_path(path: &Path) -> bool {
    path.as_os_str().len() < 108
}
