//! Turns a Box's persisted config into what boots it: the VM spec for the engine and the setup the
//! agent receives (mounts, network, injected files), plus the helper processes a running Box
//! needs (network backend, virtiofs daemons), torn down when it stops.

use boxlite_protocol::{BlockDevice, FileSpec, GuestSetup, NetworkSetup};

use crate::home::Home;
use crate::runtime::config::NetworkKind;
use crate::runtime::paths::BoxPaths;
use crate::runtime::record::BoxRecord;
use crate::vmm::accel::Accel;
use crate::vmm::{DiskSpec, GuestAssets, VmSpec};

/// Gateway and DNS address of the Box network (DESIGN.md topology).
pub const GATEWAY_IP: &str = "192.168.127.1";
/// The host alias reachable with `--allow-host`.
pub const HOST_ALIAS_IP: &str = "192.168.127.254";
pub const HOST_ALIAS_NAME: &str = "host.boxlite.internal";

/// A Box ready to boot.
pub struct Prepared {
    pub vm: VmSpec,
    pub guest: GuestSetup,
}

impl Prepared {
    /// Stops the helper processes started for the Box.
    pub fn teardown(self) {}
}

pub fn prepare(
    _home: &Home,
    record: &BoxRecord,
    paths: &BoxPaths,
    accel: Accel,
    assets: GuestAssets,
) -> Result<Prepared, String> {
    let config = &record.config;
    let disk = DiskSpec {
        path: paths.disk(),
        format: "qcow2".into(),
        serial: "root".into(),
        readonly: false,
    };
    let vm = VmSpec {
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        accel,
        assets,
        extra_cmdline: vec![],
        console_log: paths.console_log(),
        vmm_log: Some(paths.vmm_log()),
        agent_socket: Some(paths.agent_socket()),
        disks: vec![disk],
        nic: None,
        shares: vec![],
    };
    let network = match config.network {
        NetworkKind::None => None,
        // The NIC is attached once the network backends are wired into the shim.
        _ => None::<NetworkSetup>,
    };
    let guest = GuestSetup {
        hostname: record.name.clone(),
        root: BlockDevice {
            serial: "root".into(),
            fstype: "ext4".into(),
        },
        grow_root: true,
        mounts: vec![],
        network,
        files: identity_files(record, config.network != NetworkKind::None),
    };
    Ok(Prepared { vm, guest })
}

/// `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` for the Box, written over the image's
/// copies in the Box's own disk (the shared base is never touched).
fn identity_files(record: &BoxRecord, has_network: bool) -> Vec<FileSpec> {
    let config = &record.config;
    let name = &record.name;
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
    );
    if config.allow_host {
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
    let nameservers: Vec<String> = if has_network {
        vec![GATEWAY_IP.to_string()]
    } else {
        config.dns.clone()
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
