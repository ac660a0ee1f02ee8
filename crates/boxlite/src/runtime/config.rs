//! What a Box is made of: the options a user gives ([`BoxOptions`]) and the resolved, persisted
//! form ([`BoxConfig`]) that the shim boots from. Stored as JSON; unknown fields are ignored so a
//! newer boxlite's state keeps loading in an older one and the other way round.

use serde::{Deserialize, Serialize};

pub use crate::net::{NetworkKind, PortForward};
use crate::vmm::accel::AccelChoice;

/// Default search path when neither the image nor the user sets `PATH` (docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a Box's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootfsSource {
    /// An image in the store (by id, the config digest), as named by `reference`.
    Image { reference: String, image_id: String },
    /// A plain directory on the host used as the rootfs (`--rootfs DIR`, like podman's).
    Dir { path: String },
}

/// The process the image's config (or the user) says a Box runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub tty: bool,
}

/// `-v` mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountConfig {
    /// A host directory (or file) shared over virtiofs.
    HostPath {
        host: String,
        guest: String,
        readonly: bool,
    },
    /// A named volume.
    Volume {
        name: String,
        guest: String,
        readonly: bool,
    },
}

/// The defaults an image's config contributes (OCI image config `config` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageDefaults {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// Everything the user chooses when creating a Box. Fields left empty take the image's values.
#[derive(Debug, Clone, Default)]
pub struct BoxOptions {
    pub name: Option<String>,
    /// The image reference (ignored when `rootfs_dir` is set).
    pub image: String,
    /// A host directory to boot from instead of an image.
    pub rootfs_dir: Option<String>,
    /// Replaces the image's `Cmd` (docker's trailing arguments).
    pub cmd: Vec<String>,
    /// Replaces the image's `Entrypoint` when `Some` (an empty vector clears it).
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE`, applied over the image's `Env`.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Virtual size of the Box's disk in bytes (thin).
    pub disk_size: u64,
    pub mounts: Vec<MountConfig>,
    pub ports: Vec<PortForward>,
    pub network: NetworkKind,
    pub dns: Vec<String>,
    pub allow_host: bool,
    pub auto_remove: bool,
    pub accel: AccelChoice,
    /// Run no main process: the Box stays up until stopped and is driven by `exec` alone (the
    /// usual way to embed boxlite as a sandbox).
    pub idle: bool,
}

impl BoxOptions {
    /// Options for `image` with boxlite's defaults (1 CPU, 512 MiB, 10 GiB disk, usernet).
    pub fn new(image: impl Into<String>) -> BoxOptions {
        BoxOptions {
            image: image.into(),
            cpus: 1,
            memory_mib: 512,
            disk_size: 10 << 30,
            ..Default::default()
        }
    }
}

/// The resolved, persisted description of a Box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxConfig {
    pub rootfs: RootfsSource,
    /// The main process, as `docker run` would start it.
    pub main: ProcessSpec,
    /// Env, working dir and user that `exec` starts from.
    pub exec_defaults: ProcessSpec,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_size: u64,
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    #[serde(default)]
    pub network: NetworkKind,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default)]
    pub allow_host: bool,
    #[serde(default)]
    pub auto_remove: bool,
    #[serde(default)]
    pub accel: AccelChoice,
    /// The NIC's MAC address, stable for the Box's life.
    pub mac: String,
    /// The id of the Box this one was cloned from (`boxlite clone`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
}

/// Merges `KEY=VALUE` lists: later keys replace earlier ones, order of first appearance kept.
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(overrides) {
        let key = kv.split('=').next().unwrap_or(kv);
        match out.iter_mut().find(|e| e.split('=').next() == Some(key)) {
            Some(slot) => *slot = kv.clone(),
            None => out.push(kv.clone()),
        }
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    out
}

/// The main process of a Box, following `docker run`: the user's command replaces `Cmd`, the
/// user's entrypoint (if any) replaces `Entrypoint`, and the two are concatenated.
pub fn main_process(image: &ImageDefaults, opts: &BoxOptions, hostname: &str) -> ProcessSpec {
    let entrypoint = opts
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let cmd = if opts.cmd.is_empty() && opts.entrypoint.is_none() {
        image.cmd.clone()
    } else {
        opts.cmd.clone()
    };
    let mut env = merge_env(&image.env, &[format!("HOSTNAME={hostname}")]);
    env = merge_env(&env, &opts.env);
    if opts.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    ProcessSpec {
        argv: if opts.idle {
            vec![]
        } else {
            entrypoint.into_iter().chain(cmd).collect()
        },
        env,
        cwd: opts
            .workdir
            .clone()
            .unwrap_or_else(|| non_empty_or(&image.working_dir, "/")),
        user: opts.user.clone().unwrap_or_else(|| image.user.clone()),
        tty: opts.tty,
    }
}

fn non_empty_or(s: &str, default: &str) -> String {
    if s.is_empty() {
        default.to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            env: vec!["PATH=/custom/bin".into(), "A=1".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--default".into()],
            working_dir: "/work".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn docker_rules_for_entrypoint_and_cmd() {
        let mut opts = BoxOptions::new("img");
        let p = main_process(&image(), &opts, "h");
        assert_eq!(p.argv, vec!["/entry", "--default"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/work", "app"));

        opts.cmd = vec!["echo".into(), "hi".into()];
        assert_eq!(
            main_process(&image(), &opts, "h").argv,
            vec!["/entry", "echo", "hi"]
        );

        opts.entrypoint = Some(vec![]);
        assert_eq!(main_process(&image(), &opts, "h").argv, vec!["echo", "hi"]);

        opts.cmd.clear();
        opts.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(
            main_process(&image(), &opts, "h").argv,
            vec!["/bin/sh"],
            "a new entrypoint drops the image's Cmd"
        );
    }

    #[test]
    fn env_overrides_keep_order_and_path() {
        let env = merge_env(
            &["PATH=/x".into(), "A=1".into()],
            &["A=2".into(), "B=3".into()],
        );
        assert_eq!(env, vec!["PATH=/x", "A=2", "B=3"]);
        let env = merge_env(&["A=1".into()], &[]);
        assert_eq!(env[0], format!("PATH={DEFAULT_PATH}"));
    }
}

/// Parses `--memory`: a plain number is MiB; `k`, `m`, `g` and `t` suffixes (any case, an optional
/// trailing `b`) scale like docker's. Returns whole MiB (rounded down).
pub fn parse_memory(input: &str) -> Result<u32, String> {
    let err = |reason: &str| format!("invalid --memory {input:?}: {reason}");
    let s = input.trim().to_ascii_lowercase();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| err("expected a number of MiB or a size like 512m or 2g"))?;
    let scale: u64 = match unit.strip_suffix('b').unwrap_or(unit) {
        "" if unit.is_empty() => 1 << 20,
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(err("the unit must be k, m, g or t")),
    };
    let mib = number
        .checked_mul(scale)
        .map(|bytes| bytes >> 20)
        .ok_or_else(|| err("too large"))?;
    u32::try_from(mib).map_err(|_| err("too large"))
}

/// Parses `-v HOST:GUEST[:ro|:rw]` (host paths start with `/` or `.`) and `-v VOLUME:GUEST[:ro]`.
pub fn parse_mount(spec: &str) -> Result<MountConfig, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, guest, readonly) = match parts.as_slice() {
        [s, g] => (*s, *g, false),
        [s, g, "ro"] => (*s, *g, true),
        [s, g, "rw"] => (*s, *g, false),
        _ => return Err(format!("invalid -v {spec:?}: expected SOURCE:GUEST[:ro]")),
    };
    if source.is_empty() {
        return Err(format!("invalid -v {spec:?}: expected SOURCE:GUEST[:ro]"));
    }
    let guest = mount_destination(guest).map_err(|e| format!("invalid -v {spec:?}: {e}"))?;
    let guest = guest.as_str();
    if source.starts_with('/') || source.starts_with('.') {
        let host = std::fs::canonicalize(source)
            .map_err(|e| format!("invalid -v {spec:?}: host path {source}: {e}"))?;
        Ok(MountConfig::HostPath {
            host: host.display().to_string(),
            guest: guest.into(),
            readonly,
        })
    } else {
        Ok(MountConfig::Volume {
            name: source.into(),
            guest: guest.into(),
            readonly,
        })
    }
}

/// Guest paths the Box's kernel and agent own: a mount there would hide what the Box needs.
const RESERVED_DESTINATIONS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Checks a mount's guest path and returns it normalised (`/data/./x/` → `/data/x`): absolute,
/// not the root and not under `/proc`, `/sys` or `/dev`.
pub fn mount_destination(guest: &str) -> Result<String, String> {
    if !guest.starts_with('/') {
        return Err(format!(
            "the destination {guest:?} must be an absolute path in the Box"
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in guest.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let normalised = format!("/{}", parts.join("/"));
    if normalised == "/" {
        return Err("the destination / would hide the Box's root filesystem".to_string());
    }
    if let Some(reserved) = RESERVED_DESTINATIONS
        .iter()
        .find(|r| normalised == **r || normalised.starts_with(&format!("{r}/")))
    {
        return Err(format!(
            "the destination {normalised} is under {reserved}, which the Box's kernel provides"
        ));
    }
    Ok(normalised)
}

/// Checks the mounts of a Box together: every destination valid (see [`mount_destination`]) and
/// no two mounts on the same one.
pub fn validate_mounts(mounts: &[MountConfig]) -> Result<(), String> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for mount in mounts {
        let (source, guest) = match mount {
            MountConfig::HostPath { host, guest, .. } => (host, guest),
            MountConfig::Volume { name, guest, .. } => (name, guest),
        };
        let spec = format!("{source}:{guest}");
        let destination =
            mount_destination(guest).map_err(|e| format!("invalid -v {spec:?}: {e}"))?;
        if let Some((other, _)) = seen.iter().find(|(_, d)| *d == destination) {
            return Err(format!(
                "invalid -v {spec:?}: -v {other:?} already mounts on {destination}; \
                 two mounts cannot share a destination"
            ));
        }
        seen.push((spec, destination));
    }
    Ok(())
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn mounts() {
        assert_eq!(
            parse_mount("data:/data:ro").unwrap(),
            MountConfig::Volume {
                name: "data".into(),
                guest: "/data".into(),
                readonly: true
            }
        );
        assert!(parse_mount("data:relative").is_err());
        assert!(parse_mount("/nonexistent-boxlite-path:/x").is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512").unwrap(), 512);
        assert_eq!(parse_memory("1G").unwrap(), 1024);
        assert_eq!(parse_memory("1g").unwrap(), 1024);
        assert_eq!(parse_memory("768m").unwrap(), 768);
        assert_eq!(parse_memory("768MB").unwrap(), 768);
        assert_eq!(parse_memory("1048576k").unwrap(), 1024);
        assert_eq!(parse_memory("1073741824b").unwrap(), 1024);
        for bad in ["", "1.5g", "1x", "g", "-1"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destinations() {
        assert_eq!(mount_destination("/data/./x/").unwrap(), "/data/x");
        assert_eq!(mount_destination("/device").unwrap(), "/device");
        for bad in [
            "/",
            "//",
            "/x/..",
            "data",
            "/proc",
            "/sys/fs",
            "/dev/",
            "/x/../dev/shm",
        ] {
            assert!(mount_destination(bad).is_err(), "{bad}");
        }
        let on = |guest: &str| MountConfig::Volume {
            name: "v".into(),
            guest: guest.into(),
            readonly: false,
        };
        assert!(validate_mounts(&[on("/a"), on("/b")]).is_ok());
        let err = validate_mounts(&[on("/a"), on("/a/")]).unwrap_err();
        assert!(err.contains("already mounts on /a"), "{err}");
    }
}
