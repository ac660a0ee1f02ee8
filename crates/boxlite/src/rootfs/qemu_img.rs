//! Running QEMU's disk tools (`qemu-img`, `qemu-io`) and reading what they print.
//!
//! boxlite writes no qcow2 metadata itself: every image it creates, resizes, snapshots or
//! converts goes through `qemu-img`, whose output we parse from `--output=json` (QEMU's QAPI
//! `ImageInfo` and `ImageCheck` types). The tools are found on `PATH`, or through
//! `BOXLITE_QEMU_IMG` / `BOXLITE_QEMU_IO`.
//!
//! Every call names the image format explicitly (`-f`): a format is never probed, because a raw
//! disk whose first sector a guest filled with a qcow2 header would otherwise be read as qcow2
//! (and its "backing file", any host path, would become guest-visible).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// A failure to run one of QEMU's disk tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The program could not be started at all (not installed, not executable).
    #[error("cannot run {program} (install qemu-utils, or set {env})")]
    Spawn {
        program: String,
        env: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and reported a failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    /// The program's JSON output did not have the expected shape.
    #[error("cannot parse the JSON printed by `{command}`")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// An image format boxlite hands to QEMU. Always explicit; never probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses (`-f`, `-F`, `format=`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses QEMU's name of a format; `None` for formats boxlite does not accept.
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `qemu-img info --output=json` reports about one image (not its backing chain).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (allocated blocks).
    #[serde(default)]
    pub actual_size: Option<u64>,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(default)]
    pub dirty_flag: Option<bool>,
}

/// One internal snapshot as `qemu-img info` lists it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// Seconds since the epoch when the snapshot was taken.
    pub date_sec: i64,
    #[serde(default)]
    pub vm_state_size: u64,
}

/// What `qemu-img check --output=json` reports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    #[serde(default)]
    pub check_errors: u64,
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default)]
    pub leaks: u64,
    #[serde(default)]
    pub corruptions_fixed: u64,
    #[serde(default)]
    pub leaks_fixed: u64,
    /// First byte past the last cluster in use.
    #[serde(default)]
    pub image_end_offset: Option<u64>,
    #[serde(default)]
    pub total_clusters: Option<u64>,
    #[serde(default)]
    pub allocated_clusters: Option<u64>,
}

impl CheckReport {
    /// No errors, corruptions or leaks.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

fn qemu_img_program() -> PathBuf {
    std::env::var_os("BOXLITE_QEMU_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

fn qemu_io_program() -> PathBuf {
    std::env::var_os("BOXLITE_QEMU_IO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-io"))
}

fn describe(program: &Path, args: &[&OsStr]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(program: PathBuf, env: &'static str, args: &[&OsStr]) -> Result<Output, ToolError> {
    tracing::debug!(command = %describe(&program, args), "running disk tool");
    let output = Command::new(&program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ToolError::Spawn {
            program: program.display().to_string(),
            env,
            source,
        })?;
    Ok(output)
}

fn failed(program: &Path, args: &[&OsStr], output: &Output) -> ToolError {
    ToolError::Failed {
        command: describe(program, args),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    }
}

/// Runs `qemu-img ARGS`; success means exit status 0. Returns stdout.
pub fn qemu_img(args: &[&OsStr]) -> Result<Vec<u8>, ToolError> {
    let program = qemu_img_program();
    let output = run(program.clone(), "BOXLITE_QEMU_IMG", args)?;
    if !output.status.success() {
        return Err(failed(&program, args, &output));
    }
    Ok(output.stdout)
}

/// Runs `qemu-io ARGS`; success means exit status 0 and no "error"/"failed" line on stdout
/// (qemu-io reports a failed command on stdout and still exits 0). Returns stdout.
pub fn qemu_io(args: &[&OsStr]) -> Result<Vec<u8>, ToolError> {
    let program = qemu_io_program();
    let output = run(program.clone(), "BOXLITE_QEMU_IO", args)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reported_failure = stdout
        .lines()
        .any(|l| l.contains("failed") || l.starts_with("Pattern verification failed"));
    if !output.status.success() || reported_failure {
        let mut err = failed(&program, args, &output);
        if let ToolError::Failed { stderr, .. } = &mut err {
            stderr.push_str(stdout.trim());
        }
        return Err(err);
    }
    Ok(output.stdout)
}

/// `qemu-img info` of one image, its backing chain not opened (`qemu-img info` opens images
/// without their backing files). `force_share` (`-U`) reads an image a running VM holds.
pub fn info(path: &Path, format: ImageFormat, force_share: bool) -> Result<ImageInfo, ToolError> {
    let mut args: Vec<&OsStr> = vec![
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
    ];
    if force_share {
        args.push("-U".as_ref());
    }
    args.push(path.as_os_str());
    let out = qemu_img(&args)?;
    serde_json::from_slice(&out).map_err(|source| ToolError::Parse {
        command: describe(&qemu_img_program(), &args),
        source,
    })
}

/// `qemu-img check` of a qcow2 image. A report with corruptions or leaks is returned as a
/// report (exit statuses 2 and 3), not as an error; an image that cannot be checked is an error.
pub fn check(path: &Path) -> Result<CheckReport, ToolError> {
    let args: Vec<&OsStr> = vec![
        "check".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        path.as_os_str(),
    ];
    let program = qemu_img_program();
    let output = run(program.clone(), "BOXLITE_QEMU_IMG", &args)?;
    match output.status.code() {
        Some(0) | Some(2) | Some(3) => {}
        _ => return Err(failed(&program, &args, &output)),
    }
    serde_json::from_slice(&output.stdout).map_err(|source| ToolError::Parse {
        command: describe(&program, &args),
        source,
    })
}
