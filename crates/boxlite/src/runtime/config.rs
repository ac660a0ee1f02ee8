//! What a Box is made of: the options a user gives ([`BoxOptions`]) and the resolved, persisted
//! form ([`BoxConfig`]) that the shim boots from. Stored as JSON; unknown fields are ignored so a
//! newer boxlite's state keeps loading in an older one and the other way round.

use serde::{Deserialize, Serialize};

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

/// The network backend of a Box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    #[default]
    Usernet,
    Libslirp,
    Passt,
    None,
}

impl std::str::FromStr for NetworkKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "usernet" => Ok(NetworkKind::Usernet),
            "libslirp" => Ok(NetworkKind::Libslirp),
            "passt" => Ok(NetworkKind::Passt),
            "none" => Ok(NetworkKind::None),
            other => Err(format!(
                "unknown network {other:?}: expected usernet, libslirp, passt or none"
            )),
        }
    }
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

/// `-p [IP:]HOSTPORT:GUESTPORT[/tcp|/udp]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub host_ip: String,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: String,
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
    pub ports: Vec<PortConfig>,
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
    pub ports: Vec<PortConfig>,
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

/// Parses `-v HOST:GUEST[:ro|:rw]` (host paths start with `/` or `.`) and `-v VOLUME:GUEST[:ro]`.
pub fn parse_mount(spec: &str) -> Result<MountConfig, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, guest, readonly) = match parts.as_slice() {
        [s, g] => (*s, *g, false),
        [s, g, "ro"] => (*s, *g, true),
        [s, g, "rw"] => (*s, *g, false),
        _ => {
            return Err(format!(
                "invalid volume {spec:?}: expected SOURCE:GUEST[:ro]"
            ))
        }
    };
    if source.is_empty() || !guest.starts_with('/') {
        return Err(format!(
            "invalid volume {spec:?}: the guest path must be absolute"
        ));
    }
    if source.starts_with('/') || source.starts_with('.') {
        let host = std::fs::canonicalize(source)
            .map_err(|e| format!("invalid volume {spec:?}: host path {source}: {e}"))?;
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

/// Parses `-p [IP:]HOSTPORT:GUESTPORT[/tcp|/udp]` (host IP defaults to 127.0.0.1).
pub fn parse_port(spec: &str) -> Result<PortConfig, String> {
    let bad =
        || format!("invalid port mapping {spec:?}: expected [IP:]HOSTPORT:GUESTPORT[/tcp|/udp]");
    let (ports, protocol) = match spec.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => return Err(bad()),
        None => (spec, "tcp"),
    };
    let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
    let (host_ip, host_port, guest_port) = match parts.as_slice() {
        [g, h] => ("127.0.0.1", *h, *g),
        [g, h, ip] => (ip.trim_start_matches('[').trim_end_matches(']'), *h, *g),
        _ => return Err(bad()),
    };
    let host_ip = if host_ip.is_empty() {
        "127.0.0.1"
    } else {
        host_ip
    };
    host_ip.parse::<std::net::IpAddr>().map_err(|_| bad())?;
    let host_port: u16 = host_port.parse().map_err(|_| bad())?;
    let guest_port: u16 = guest_port.parse().map_err(|_| bad())?;
    if guest_port == 0 {
        return Err(bad());
    }
    Ok(PortConfig {
        host_ip: host_ip.into(),
        host_port,
        guest_port,
        protocol: protocol.into(),
    })
}

/// Parses sizes like `512M`, `10G`, `1048576` (bytes; K/M/G/T are powers of 1024).
pub fn parse_size(spec: &str) -> Result<u64, String> {
    let s = spec.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid size {spec:?}"))?;
    let mult: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {spec:?}: use a number with K, M, G or T"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {spec:?} is too large"))
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn ports() {
        let p = parse_port("8080:80").unwrap();
        assert_eq!(
            (
                p.host_ip.as_str(),
                p.host_port,
                p.guest_port,
                p.protocol.as_str()
            ),
            ("127.0.0.1", 8080, 80, "tcp")
        );
        let p = parse_port("0.0.0.0:0:53/udp").unwrap();
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.protocol.as_str()),
            ("0.0.0.0", 0, "udp")
        );
        for bad in ["80", "a:80", "1:2/sctp", "1:0", "300.1.1.1:1:2"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_mounts() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("1X").is_err());
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
}
