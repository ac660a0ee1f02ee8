//! Preparing a Box's root disk: the image's read-only base and the Box's QCOW2 overlay on it.
//!
//! Known shortcoming: this is the first, plain version (an ext4 base built with `mke2fs -d` from a
//! rootfs directory, and `qemu-img create` for the overlay). The `rootfs` module's base builder and
//! overlay checks replace it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::home::Home;

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tree_size(dir: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1", "--apparent-size"])
        .arg(dir)
        .output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(64 << 20)
}

/// Builds (once) an ext4 base image of `dir` under `images/rootfs/`, keyed by `key`.
pub fn ensure_base(home: &Home, key: &str, dir: &Path) -> Result<PathBuf, String> {
    let base = home.rootfs_dir().join(format!("{key}.ext4"));
    if base.exists() {
        return Ok(base);
    }
    let size = tree_size(dir) * 3 / 2 + (64 << 20);
    let tmp = home
        .tmp_dir()
        .join(format!("{key}.ext4.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(&tmp)
        .arg(format!("{}k", size / 1024)))?;
    std::fs::rename(&tmp, &base).map_err(|e| format!("cannot store {}: {e}", base.display()))?;
    Ok(base)
}

/// The key of a host directory used as a rootfs.
pub fn dir_key(dir: &Path) -> String {
    format!(
        "dir-{}",
        &hex::encode(Sha256::digest(dir.as_os_str().as_encoded_bytes()))[..16]
    )
}

/// Creates the Box's overlay `disk` over `base` (raw), with a relative backing path.
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), String> {
    let rel = relative_to(base, disk.parent().unwrap_or(Path::new("/")));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&rel)
        .arg(disk)
        .arg(size.to_string()))
}

fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel
}
