//! Helpers shared by the disk, qcow2 and volume tests: the shared failing-input cases and the
//! real `qemu-img`/`qemu-io`, used as a user would to check what boxlite produced.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The generator of shared case `prefix` (e.g. "31-"): `<repo>/../shared/cases/` first (CI puts
/// a copy of shared/ beside the clone), then `/work/shared/cases/`.
pub fn case_file(prefix: &str, ext: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in [
        repo.join("../shared/cases"),
        PathBuf::from("/work/shared/cases"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && name.ends_with(ext) {
                    return e.path();
                }
            }
        }
    }
    panic!("shared case {prefix}*{ext} not found beside the repository or in /work/shared/cases");
}

/// Runs the generator of case `prefix` into `out` with extra arguments.
pub fn generate_case(prefix: &str, out: &Path, extra: &[&str]) {
    let script = case_file(prefix, ".py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(out)
        .args(extra)
        .status()
        .expect("run python3");
    assert!(status.success(), "generator {} failed", script.display());
}

fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `qemu-img ARGS`, asserting success; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let (code, out, err) = run("qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?} failed: {err}{out}");
    out
}

/// Runs `qemu-io ARGS`, asserting success; returns stdout.
pub fn qemu_io(args: &[&str]) -> String {
    let (code, out, err) = run("qemu-io", args);
    assert!(
        code == 0 && !out.contains("failed"),
        "qemu-io {args:?} failed: {err}{out}"
    );
    out
}

/// Asserts what a user would: `qemu-img check` exits 0 saying "No errors were found", and the
/// file covers the image end offset it reports.
pub fn assert_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", p]);
    assert_eq!(code, 0, "qemu-img check {p}: exit {code}\n{out}{err}");
    assert!(
        out.contains("No errors were found"),
        "qemu-img check {p}:\n{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&qemu_img(&["check", "--output=json", "-f", "qcow2", p])).unwrap();
    let end = json["image-end-offset"].as_u64().expect("image-end-offset");
    let len = std::fs::metadata(path).unwrap().len();
    assert!(
        len >= end,
        "{p}: file length {len} < image end offset {end}"
    );
}

/// `qemu-img info --output=json` (format explicit).
pub fn info_json(path: &Path, format: &str) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-U",
        "-f",
        format,
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

/// The guest-visible contents of a qcow2 image (optionally one internal snapshot), through
/// `qemu-img convert -O raw`.
pub fn guest_bytes(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let mut args = vec!["convert", "-U", "-f", "qcow2"];
    let snap_arg;
    if let Some(s) = snapshot {
        snap_arg = format!("snapshot.name={s}");
        args.extend(["-l", &snap_arg]);
    }
    args.extend(["-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    std::fs::read(out).unwrap()
}

/// Blocks the file occupies on the host, in bytes (what `du` counts).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Names in a folder, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `len` guest bytes at `offset` of a qcow2 image, through `qemu-io -r` (hex dump parsed).
pub fn guest_read(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let out = qemu_io(&[
        "-r",
        "-U",
        "-f",
        "qcow2",
        "-c",
        &format!("read -v {offset} {len}"),
        path.to_str().unwrap(),
    ]);
    let mut bytes = Vec::new();
    for line in out.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if u64::from_str_radix(addr.trim(), 16).is_err() {
            continue;
        }
        for hex in rest.split_whitespace().take(16) {
            if hex.len() == 2 {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    bytes.push(b);
                }
            }
        }
    }
    bytes.truncate(len as usize);
    assert_eq!(bytes.len() as u64, len, "qemu-io read output:\n{out}");
    bytes
}

/// Writes `len` bytes of `pattern` at `offset` of a qcow2 image with `qemu-io`.
pub fn guest_write(path: &Path, offset: u64, len: u64, pattern: u8) {
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        &format!("write -P {pattern} {offset} {len}"),
        path.to_str().unwrap(),
    ]);
}

/// Builds a small rootfs with the project's busybox script.
pub fn busybox_tree(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-busybox-rootfs.sh");
    let status = Command::new("bash").arg(script).arg(dir).status().unwrap();
    assert!(status.success());
}

/// `du -s --block-size=1` of a folder.
pub fn du_bytes(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Makes cluster 6 of a freshly created qcow2 image a leak (refcount 1, no reference), what a
/// crash between allocating and referencing a cluster leaves.
pub fn make_leak(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 104];
    f.read_exact(&mut h).unwrap();
    let reftable = u64::from_be_bytes(h[48..56].try_into().unwrap());
    f.seek(SeekFrom::Start(reftable)).unwrap();
    let mut e = [0u8; 8];
    f.read_exact(&mut e).unwrap();
    let refblock = u64::from_be_bytes(e);
    f.seek(SeekFrom::Start(refblock + 6 * 2)).unwrap();
    f.write_all(&1u16.to_be_bytes()).unwrap();
    let len = f.metadata().unwrap().len().max(7 * 65536);
    f.set_len(len).unwrap();
}
