//! QEMU as the VM engine: `qemu-system-x86_64` from Debian (10.x from bookworm-backports), a q35
//! machine with qboot firmware, the uncompressed kernel booted through PVH, and virtio-pci devices
//! only: virtio-blk disks, a virtio-net NIC on a `-netdev stream` unix socket, vhost-user-fs shares
//! and one virtio-serial port for the agent.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{Accel, Engine, VmSpec, VmmError};

/// Kernel command line every Box boots with (see the VM notes: PVH vmlinux, serial console).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet tsc_early_khz=2300000";
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Drives `qemu-system-x86_64`.
#[derive(Debug, Clone)]
pub struct QemuEngine {
    program: PathBuf,
}

impl Default for QemuEngine {
    fn default() -> Self {
        let program = std::env::var_os("BOXLITE_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        QemuEngine { program }
    }
}

impl QemuEngine {
    /// The full argument list for `spec` (without the program name).
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        let machine = "q35";
        push(&["-M", machine]);
        if Path::new(QBOOT).exists() {
            push(&["-bios", QBOOT]);
        }
        match spec.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
        }
        let cpus = spec.cpus.max(1).to_string();
        let mem = spec.memory_mib.max(64).to_string();
        push(&["-smp", &cpus, "-m", &mem]);
        if !spec.shares.is_empty() {
            let backend = format!("memory-backend-memfd,id=mem,size={mem}M,share=on");
            push(&["-object", &backend, "-numa", "node,memdev=mem"]);
        }
        let mut cmdline = BASE_CMDLINE.to_string();
        for extra in &spec.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        push(&[
            "-kernel",
            &path(&spec.assets.kernel),
            "-initrd",
            &path(&spec.assets.initrd),
        ]);
        push(&["-append", &cmdline]);
        let serial = format!("file:{}", path(&spec.console_log));
        push(&["-serial", &serial]);
        if let Some(sock) = &spec.agent_socket {
            let chardev = format!("socket,id=agent,path={},server=on,wait=off", path(sock));
            push(&["-device", "virtio-serial-pci,id=vser", "-chardev", &chardev]);
            push(&[
                "-device",
                "virtserialport,bus=vser.0,chardev=agent,name=boxlite.agent",
            ]);
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let ro = if disk.readonly { ",read-only=on" } else { "" };
            let drive = format!(
                "file={},if=none,id=disk{i},format={},cache=writeback,discard=unmap{ro}",
                path(&disk.path),
                disk.format
            );
            let dev = format!("virtio-blk-pci,drive=disk{i},serial={}", disk.serial);
            push(&["-drive", &drive, "-device", &dev]);
        }
        if let Some(nic) = &spec.nic {
            let netdev = format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                path(&nic.socket)
            );
            let dev = format!("virtio-net-pci,netdev=net0,mac={}", nic.mac);
            push(&["-netdev", &netdev, "-device", &dev]);
        }
        for (i, share) in spec.shares.iter().enumerate() {
            let chardev = format!("socket,id=fs{i},path={}", path(&share.socket));
            let dev = format!(
                "vhost-user-fs-pci,queue-size=1024,chardev=fs{i},tag={}",
                share.tag
            );
            push(&["-chardev", &chardev, "-device", &dev]);
        }
        a
    }
}

fn path(p: &Path) -> String {
    // QEMU splits option values at commas; a comma in a path is written twice.
    p.display().to_string().replace(',', ",,")
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn spawn(&self, spec: &VmSpec) -> Result<Child, VmmError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &spec.vmm_log {
            Some(log) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(|e| VmmError::Io {
                        context: format!("cannot open {}", log.display()),
                        source: e,
                    })?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::piped());
            }
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; it only makes the VMM die with
        // the process that owns it (the shim), so no guest outlives its owner.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| VmmError::Spawn {
            program: self.program.display().to_string(),
            source: e,
        })
    }
}
