//! Choosing the accelerator: KVM where it runs guests, QEMU's TCG (software emulation) where not.
//!
//! Opening `/dev/kvm` is not enough: nested setups (such as the PVM software hypervisor) accept
//! `KVM_CREATE_VM` yet cannot run a stock kernel, which then spins without progress. So the choice
//! is made in two steps: a cheap look at the host (no `/dev/kvm`, or a CPU without VT-x/AMD-V
//! flags, means TCG at once), then, where KVM looks usable, a real boot of the guest kernel in
//! probe mode that must print its marker within a deadline. The verdict is cached per host boot.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{assets::GuestAssets, Engine, VmSpec, VmmError};

/// The marker the agent prints in probe mode (`boxlite.probe=1`) before powering off.
pub const PROBE_MARKER: &str = "BOXLITE-PROBE-OK";

/// A hardware or software accelerator for the guest CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for: a fixed accelerator or the probe's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: expected auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator chosen and, for TCG in auto mode, why KVM was not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    /// Set when auto mode fell back to TCG: the reason, for the one-line warning.
    pub fallback_reason: Option<String>,
}

/// Why KVM cannot be used, judged from the host alone; `None` when it looks usable.
pub fn host_kvm_obstacle() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm cannot be opened ({e})"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is the PVM software hypervisor, which cannot run stock kernels".into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_virt {
        return Some(
            "the CPU has no VT-x/AMD-V (nested KVM without them cannot run stock kernels)".into(),
        );
    }
    None
}

/// Boots the guest kernel under KVM in probe mode and waits for its marker on the console.
/// `Err` carries why KVM is unusable (no progress before `deadline`, or the VMM failed).
pub fn probe_kvm_boot(
    engine: &dyn Engine,
    assets: &GuestAssets,
    workdir: &Path,
    deadline: Duration,
) -> Result<(), String> {
    let console = workdir.join("probe-console.log");
    let _ = std::fs::remove_file(&console);
    let spec = VmSpec {
        cpus: 1,
        memory_mib: 128,
        accel: Accel::Kvm,
        assets: assets.clone(),
        extra_cmdline: vec!["boxlite.probe=1".into()],
        console_log: console.clone(),
        vmm_log: None,
        agent_socket: None,
        disks: vec![],
        nic: None,
        shares: vec![],
    };
    let mut child = engine.spawn(&spec).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let verdict = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(PROBE_MARKER) {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains(PROBE_MARKER) {
                break Ok(());
            }
            break Err(format!(
                "the probe guest exited ({status}) without booting: {}",
                stderr.trim()
            ));
        }
        if started.elapsed() > deadline {
            break Err(format!(
                "a guest under KVM made no progress within {:.0} s",
                deadline.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    verdict
}

#[derive(Serialize, Deserialize)]
struct CachedVerdict {
    boot_id: String,
    decision: AccelDecision,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .into()
}

/// Decides the accelerator for `choice`. Auto mode consults the cache in `cache_dir` (valid for
/// this host boot), then the host, then a probe boot.
pub fn decide(
    choice: AccelChoice,
    engine: &dyn Engine,
    assets: &GuestAssets,
    cache_dir: &Path,
) -> Result<AccelDecision, VmmError> {
    match choice {
        AccelChoice::Tcg => {
            return Ok(AccelDecision {
                accel: Accel::Tcg,
                fallback_reason: None,
            })
        }
        AccelChoice::Kvm => {
            if let Some(reason) = host_kvm_obstacle().filter(|r| r.contains("cannot be opened")) {
                return Err(VmmError::KvmUnusable(reason));
            }
            return Ok(AccelDecision {
                accel: Accel::Kvm,
                fallback_reason: None,
            });
        }
        AccelChoice::Auto => {}
    }
    let cache = cache_dir.join("accel.json");
    let id = boot_id();
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(cached) = serde_json::from_str::<CachedVerdict>(&text) {
            if cached.boot_id == id {
                return Ok(cached.decision);
            }
        }
    }
    let decision = match host_kvm_obstacle() {
        Some(reason) => AccelDecision {
            accel: Accel::Tcg,
            fallback_reason: Some(reason),
        },
        None => match probe_kvm_boot(engine, assets, cache_dir, Duration::from_secs(10)) {
            Ok(()) => AccelDecision {
                accel: Accel::Kvm,
                fallback_reason: None,
            },
            Err(reason) => AccelDecision {
                accel: Accel::Tcg,
                fallback_reason: Some(reason),
            },
        },
    };
    let verdict = CachedVerdict {
        boot_id: id,
        decision: decision.clone(),
    };
    let tmp = cache_dir.join(format!(".accel.json.{}", std::process::id()));
    if std::fs::write(&tmp, serde_json::to_vec(&verdict).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    Ok(decision)
}
