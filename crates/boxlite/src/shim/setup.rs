//! Turns a Box's persisted config into what boots it: the VM spec for the engine and the setup the
//! agent receives (mounts, network, injected files), plus the helper processes a running Box
//! needs (the network backend, virtiofs daemons), torn down when it stops.

use boxlite_protocol::{BlockDevice, FileSpec, GuestSetup, NetworkSetup};
use tracing::warn;

use crate::home::Home;
use crate::net::{parse_dns_server, NetworkConfig, NetworkHandle, NetworkKind, NetworkOptions};
use crate::rootfs::disk::BoxDisk;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::BoxRecord;
use crate::vmm::accel::Accel;
use crate::vmm::{DiskSpec, GuestAssets, NicSpec, VmSpec};

/// The host alias reachable with `--allow-host`.
pub const HOST_ALIAS_IP: &str = "192.168.127.254";
pub const HOST_ALIAS_NAME: &str = "host.boxlite.internal";

/// The running network backend, shared between the shim's main thread and its router.
pub type SharedNetwork = std::sync::Arc<std::sync::Mutex<Option<NetworkHandle>>>;

/// Records the backend's configuration (with the host ports it picked) in `network.json`, for
/// `inspect` and `port ls`.
pub fn write_network_file(paths: &BoxPaths, config: &NetworkConfig) {
    let path = paths.network_file();
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(config)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!("cannot write {}: {e}", path.display());
    }
}

/// A Box ready to boot, and what must be stopped when it is gone.
pub struct Prepared {
    pub vm: VmSpec,
    pub guest: GuestSetup,
    pub network: SharedNetwork,
    pub extras: crate::shim::mounts::MountHelpers,
}

impl Prepared {
    /// Stops the helper processes started for the Box.
    pub fn teardown(&mut self) {
        if let Some(net) = self.network.lock().unwrap().take() {
            if let Err(e) = net.stop() {
                warn!("stopping the network backend: {e}");
            }
        }
        self.extras.stop();
    }
}

pub fn prepare(
    home: &Home,
    record: &BoxRecord,
    paths: &BoxPaths,
    accel: Accel,
    assets: GuestAssets,
) -> Result<Prepared, String> {
    let config = &record.config;
    let disk = BoxDisk::open(home, &record.id).map_err(|e| format!("root disk: {e}"))?;
    disk.prepare_boot().map_err(|e| format!("root disk: {e}"))?;
    let (network, network_config) = start_network(record, paths)?;
    let mut vm = VmSpec {
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        accel,
        assets,
        extra_cmdline: vec![],
        console_log: paths.console_log(),
        vmm_log: Some(paths.vmm_log()),
        agent_socket: Some(paths.agent_socket()),
        disks: vec![DiskSpec {
            path: disk.path().to_path_buf(),
            format: "qcow2".into(),
            serial: "root".into(),
            readonly: false,
        }],
        nic: None,
        shares: vec![],
    };
    let mut guest = GuestSetup {
        hostname: record.name.clone(),
        root: BlockDevice {
            serial: "root".into(),
            fstype: "ext4".into(),
        },
        grow_root: true,
        mounts: vec![],
        network: None,
        files: vec![],
    };
    if let (Some(cfg), Some(socket)) = (
        &network_config,
        network_config.as_ref().and_then(|c| c.socket_path.clone()),
    ) {
        vm.nic = Some(NicSpec {
            socket,
            mac: cfg.guest_mac.clone(),
        });
        guest.network = Some(NetworkSetup {
            mac: cfg.guest_mac.clone(),
            dhcp_timeout_secs: 30,
        });
    }
    let extras = crate::shim::mounts::attach(home, record, paths, &mut vm, &mut guest)?;
    guest.files = identity_files(record, network_config.as_ref());
    if let Some(cfg) = &network_config {
        write_network_file(paths, cfg);
    }
    let network = std::sync::Arc::new(std::sync::Mutex::new(network));
    Ok(Prepared {
        vm,
        guest,
        network,
        extras,
    })
}

fn start_network(
    record: &BoxRecord,
    paths: &BoxPaths,
) -> Result<(Option<NetworkHandle>, Option<NetworkConfig>), String> {
    let config = &record.config;
    if config.network == NetworkKind::None {
        return Ok((None, None));
    }
    let mut opts = NetworkOptions::new(config.network, &paths.sock_dir);
    opts.port_forwards = config.ports.clone();
    opts.dns = config
        .dns
        .iter()
        .map(|d| parse_dns_server(d).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    opts.allow_host = config.allow_host;
    opts.hostname = Some(record.name.clone());
    let (handle, cfg) = NetworkHandle::start(opts).map_err(|e| {
        format!(
            "cannot start the {} network backend: {}",
            config.network,
            crate::shim::error_chain(&e)
        )
    })?;
    Ok((Some(handle), Some(cfg)))
}

/// `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` for the Box, written over the image's
/// copies in the Box's own disk (the shared base is never touched).
fn identity_files(record: &BoxRecord, network: Option<&NetworkConfig>) -> Vec<FileSpec> {
    let config = &record.config;
    let name = &record.name;
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
    );
    if config.allow_host && network.is_some() {
        hosts.push_str(&format!("{HOST_ALIAS_IP}\t{HOST_ALIAS_NAME}\n"));
    }
    let mut files = vec![
        FileSpec {
            path: "/etc/hostname".into(),
            contents: format!("{name}\n"),
            mode: 0o644,
        },
        FileSpec {
            path: "/etc/hosts".into(),
            contents: hosts,
            mode: 0o644,
        },
    ];
    let nameservers: Vec<String> = match network {
        Some(net) => net.dns.iter().map(|ip| ip.to_string()).collect(),
        None => config.dns.clone(),
    };
    if !nameservers.is_empty() {
        let contents: String = nameservers
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect();
        files.push(FileSpec {
            path: "/etc/resolv.conf".into(),
            contents,
            mode: 0o644,
        });
    }
    files
}
