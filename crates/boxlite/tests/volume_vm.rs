//! A real guest uses what the volumes module hands out: a named volume (qcow2, attached by
//! serial, formatted ext4 in the guest) killed with SIGKILL mid-write still passes
//! `qemu-img check` and keeps what was synced; a virtiofs share is visible both ways and a
//! read-only share refuses writes on the host side; a raw disk that looks like qcow2 (shared
//! case 34) attached as raw stays raw in the guest.
//!
//! Boots Debian's kernel (`bash scripts/fetch-kernel.sh` → assets/kernel) under QEMU (TCG is
//! fine) with a busybox initramfs built here. Needs qemu-system-x86, virtiofsd, busybox-static,
//! cpio, e2fsprogs.

mod disk_support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boxlite::home::Home;
use boxlite::rootfs::attach::{BlockTransport, DiskAttachment};
use boxlite::rootfs::ImageFormat;
use boxlite::volumes::virtiofs::{
    memory_backend_args, plan_share, ShareOptions, Transport, Virtiofsd,
};
use boxlite::volumes::Volumes;
use disk_support::*;

const MEM_MIB: u64 = 256;

fn kernel_dir() -> PathBuf {
    let dir = std::env::var_os("BOXLITE_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/kernel"));
    assert!(
        dir.join("vmlinux").exists(),
        "no guest kernel in {}: run `bash scripts/fetch-kernel.sh`",
        dir.display()
    );
    dir
}

/// Modules in load order (dependencies first), from modules.dep.
fn module_order(modules_root: &Path, wanted: &[&str]) -> Vec<String> {
    let dep = std::fs::read_to_string(modules_root.join("modules.dep")).unwrap();
    let deps: std::collections::HashMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_string(),
                d.split_whitespace().map(String::from).collect(),
            )
        })
        .collect();
    fn visit(
        m: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        // modules.dep lists a module's dependencies closest first; load the farthest first.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, seen, out);
        }
        out.push(m.to_string());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        let key = deps
            .keys()
            .find(|k| k.ends_with(&format!("/{w}.ko")))
            .unwrap_or_else(|| panic!("module {w} not found"))
            .clone();
        visit(&key, &deps, &mut seen, &mut out);
    }
    out
}

fn copy_with_parents(src: &Path, root: &Path) {
    let dst = root.join(src.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, &dst).unwrap();
}

/// A gzip'd newc initramfs: busybox, host mke2fs with its libraries, the modules, `/init`.
fn build_initramfs(work: &Path, init: &str) -> PathBuf {
    let kernel = kernel_dir();
    let version = std::fs::read_to_string(kernel.join("VERSION")).unwrap();
    let version = version.trim();
    let modules_root = kernel.join("modules/lib/modules").join(version);
    let root = work.join("initramfs");
    for d in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "mnt",
        "etc",
        "lib/modules",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    copy_with_parents(Path::new("/sbin/mke2fs"), &root);
    copy_with_parents(Path::new("/etc/mke2fs.conf"), &root);
    let ldd = Command::new("ldd").arg("/sbin/mke2fs").output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(lib) = lib {
            copy_with_parents(&lib, &root);
        }
    }
    let order = module_order(
        &modules_root,
        &[
            "virtio_pci",
            "virtio_blk",
            "virtiofs",
            "crc32c_generic",
            "ext4",
        ],
    );
    let mut list = String::new();
    for m in &order {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::copy(modules_root.join(m), root.join("lib/modules").join(&name)).unwrap();
        list.push_str(&name);
        list.push('\n');
    }
    std::fs::write(root.join("modules.order"), list).unwrap();
    std::fs::write(root.join("init"), init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = work.join("initramfs.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg("cd \"$0\" && find . | cpio -o -H newc --quiet | gzip -1 > \"$1\"")
        .arg(&root)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    // Firmware tables sit at the top of RAM where QEMU places the initrd; an initrd whose size
    // ends near a 4 KiB boundary gets clobbered (shared VM notes). Zero padding is skipped by
    // the kernel's unpacker; make the size 1 past a boundary.
    let len = std::fs::metadata(&out).unwrap().len();
    let padded = (len / 4096 + 1) * 4096 + 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(padded)
        .unwrap();
    out
}

const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "INSMOD-FAIL $m"; done
dev=
for b in /sys/block/vd*; do
  [ "$(cat $b/serial 2>/dev/null)" = "@SERIAL@" ] && dev=/dev/${b##*/}
done
echo "VOLUME-DEVICE $dev"
mkdir -p /mnt/share /mnt/ro /mnt/vol
"#;

const INIT_FIRST: &str = r#"
mount -t virtiofs share /mnt/share && echo SHARE-MOUNTED
echo "FROM-HOST $(cat /mnt/share/from-host.txt)"
echo "hello from guest" > /mnt/share/to-host.txt
sync
mount -t virtiofs roshare /mnt/ro && echo RO-MOUNTED
if echo x > /mnt/ro/nope 2>/dev/null; then echo RO-BROKEN; else echo RO-ENFORCED; fi
/sbin/mke2fs -q -F -t ext4 $dev && mount -t ext4 $dev /mnt/vol && echo VOL-MOUNTED
echo persisted > /mnt/vol/marker
sync
echo WRITING
i=0
while true; do
  dd if=/dev/urandom of=/mnt/vol/f$i bs=64k count=16 2>/dev/null
  i=$((i+1))
  [ $((i % 8)) = 0 ] && sync && echo "SYNCED $i"
done
"#;

const INIT_SECOND: &str = r#"
for b in /sys/block/vd*; do
  [ "$(cat $b/serial 2>/dev/null)" = "case34" ] && raw=/dev/${b##*/} && rawsys=$b
done
echo "RAW-SECTORS $(cat $rawsys/size)"
echo "RAW-HEAD $(dd if=$raw bs=1 skip=1 count=2 2>/dev/null)"
echo "RAW-MARK $(dd if=$raw bs=1 skip=1048576 count=7 2>/dev/null)"
echo "RAW-5A $(dd if=$raw bs=64k 2>/dev/null | tr -d -c 'Z' | wc -c)"
mount -t ext4 $dev /mnt/vol && echo VOL-MOUNTED
echo "MARKER $(cat /mnt/vol/marker)"
ls /mnt/vol | wc -l | sed 's/^/FILES /'
umount /mnt/vol && echo VOL-UNMOUNTED
poweroff -f
"#;

struct Guest {
    qemu: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Guest {
    fn boot(initrd: &Path, extra: &[String]) -> Guest {
        let kernel = kernel_dir();
        let mut args: Vec<String> = [
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-m",
            &MEM_MIB.to_string(),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            kernel.join("vmlinux").to_str().unwrap(),
            "-initrd",
            initrd.to_str().unwrap(),
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 initramfs_async=0 tsc_early_khz=2300000 rdinit=/init",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if Path::new("/usr/share/qemu/qboot.rom").exists() {
            args.extend(["-bios".into(), "/usr/share/qemu/qboot.rom".into()]);
        }
        args.extend(extra.iter().cloned());
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = qemu.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            qemu,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a console line starting with `prefix`; returns it.
    fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim_end_matches('\r').to_string();
                    self.log.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "guest never printed {prefix:?}; console:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    fn kill(mut self) {
        // SIGKILL, as a crash would.
        self.qemu.kill().unwrap();
        self.qemu.wait().unwrap();
    }

    fn wait_poweroff(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.qemu.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.qemu.kill().unwrap();
        panic!("guest did not power off; console:\n{}", self.log.join("\n"));
    }
}

#[test]
fn guest_volume_survives_sigkill_and_virtiofs_works_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let home = Home::open(work.join("home")).unwrap();
    let mut volumes = Volumes::open(&home).unwrap();
    volumes.create("data", Some(1 << 30), None).unwrap();
    let lease = volumes.acquire("data", "vm-box", true).unwrap();

    let shared = work.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("from-host.txt"), "hello from host\n").unwrap();
    let ro_dir = work.join("ro");
    std::fs::create_dir(&ro_dir).unwrap();

    let staging = work.join("staging");
    let rw_plan = plan_share(&shared, false, &staging.join("0")).unwrap();
    let ro_plan = plan_share(&ro_dir, true, &staging.join("1")).unwrap();
    let fs0 = Virtiofsd::spawn(
        &rw_plan,
        &ShareOptions::new("share", &work.join("fs0.sock")),
    )
    .unwrap();
    let fs1 = Virtiofsd::spawn(
        &ro_plan,
        &ShareOptions::new("roshare", &work.join("fs1.sock")),
    )
    .unwrap();

    let drive = |path: &Path, serial: &str| -> Vec<String> {
        DiskAttachment {
            path,
            format: lease.format(),
            id: "vol0",
            serial,
            read_only: false,
        }
        .qemu_args(BlockTransport::Pci)
    };
    let mut extra = memory_backend_args(MEM_MIB, true);
    extra.extend(fs0.qemu_args(0, Transport::Pci));
    extra.extend(fs1.qemu_args(1, Transport::Pci));
    extra.extend(drive(&lease.path, &lease.serial));

    let head = INIT_HEAD.replace("@SERIAL@", &lease.serial);
    let first = build_initramfs(&work.join("first"), &(head.clone() + INIT_FIRST));
    let mut guest = Guest::boot(&first, &extra);
    let boot = Duration::from_secs(120);
    let device = guest.expect("VOLUME-DEVICE", boot);
    assert!(device.starts_with("VOLUME-DEVICE /dev/vd"), "{device}");
    guest.expect("SHARE-MOUNTED", boot);
    assert_eq!(guest.expect("FROM-HOST", boot), "FROM-HOST hello from host");
    guest.expect("RO-MOUNTED", boot);
    assert_eq!(guest.expect("RO-", boot), "RO-ENFORCED");
    guest.expect("VOL-MOUNTED", boot);
    guest.expect("WRITING", boot);
    // Two rounds of 8 MiB synced, then kill while the third round is being written.
    guest.expect("SYNCED 16", boot);
    std::thread::sleep(Duration::from_millis(700));
    guest.kill();

    assert_eq!(
        std::fs::read_to_string(shared.join("to-host.txt")).unwrap(),
        "hello from guest\n",
        "guest writes reach the host through virtiofs"
    );
    assert!(!ro_dir.join("nope").exists());
    // A kill between allocating clusters and referencing them may leak some (wasted space, no
    // harm to data); nothing may be corrupt. The next attach repairs leaks, as a Box's next
    // start does, and then the check is clean.
    let report = boxlite::rootfs::qcow2::check(&lease.path).unwrap();
    assert_eq!(
        (report.check_errors, report.corruptions),
        (0, 0),
        "after SIGKILL: {report:?}"
    );
    volumes.release("data", "vm-box").unwrap();
    let lease = volumes.acquire("data", "vm-box", true).unwrap();
    assert_check_clean(&lease.path);
    let used = allocated_bytes(&lease.path);
    assert!(
        used > 4 << 20,
        "the guest wrote into the volume ({used} bytes)"
    );
    drop(fs0);
    drop(fs1);

    // Second boot: the journal replays and what was synced is there.
    // Shared case 34, the attach side: a raw disk whose first sector looks like qcow2 (naming a
    // host file of 0x5A bytes as its backing file) is attached as raw and stays raw.
    let case34 = work.join("case34");
    let sentinel = work.join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("secret"), vec![0x5a; 2 << 20]).unwrap();
    generate_case("34-", &case34, &[sentinel.to_str().unwrap()]);
    let mut extra = drive(&lease.path, &lease.serial);
    extra.extend(
        DiskAttachment {
            path: &case34.join("base.raw"),
            format: ImageFormat::Raw,
            id: "case34",
            serial: "case34",
            read_only: true,
        }
        .qemu_args(BlockTransport::Pci),
    );

    let second = build_initramfs(&work.join("second"), &(head + INIT_SECOND));
    let mut guest = Guest::boot(&second, &extra);
    assert_eq!(guest.expect("RAW-SECTORS", boot), "RAW-SECTORS 4096");
    assert_eq!(guest.expect("RAW-HEAD", boot), "RAW-HEAD FI");
    assert_eq!(guest.expect("RAW-MARK", boot), "RAW-MARK RAWMARK");
    assert_eq!(
        guest.expect("RAW-5A", boot),
        "RAW-5A 0",
        "no byte of the host secret"
    );
    guest.expect("VOL-MOUNTED", boot);
    assert_eq!(guest.expect("MARKER", boot), "MARKER persisted");
    let files: u32 = guest.expect("FILES", boot)[6..].trim().parse().unwrap();
    assert!(
        files >= 17,
        "the marker and 16 synced files survive: {files}"
    );
    guest.expect("VOL-UNMOUNTED", boot);
    guest.wait_poweroff(Duration::from_secs(30));
    assert_check_clean(&lease.path);
    volumes.release("data", "vm-box").unwrap();
}
