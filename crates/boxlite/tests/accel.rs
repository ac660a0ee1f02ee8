//! The accelerator choice against the real host: KVM is used only where a guest really boots
//! under it, otherwise TCG with the reason recorded (for the CLI's one-line warning).

use std::time::Duration;

use boxlite::vmm::accel::{decide, host_kvm_obstacle, probe_kvm_boot, Accel, AccelChoice};
use boxlite::vmm::qemu::QemuEngine;
use boxlite::vmm::GuestAssets;

fn assets() -> GuestAssets {
    GuestAssets::locate().expect("guest assets: run scripts/build-assets.sh first")
}

#[test]
fn the_boot_probe_agrees_with_what_the_host_can_do() {
    let dir = tempfile::tempdir().unwrap();
    let engine = QemuEngine::default();
    if !std::path::Path::new("/dev/kvm").exists() {
        let err = probe_kvm_boot(&engine, &assets(), dir.path(), Duration::from_secs(5));
        assert!(err.is_err(), "no /dev/kvm: the probe cannot succeed");
        return;
    }
    let verdict = probe_kvm_boot(&engine, &assets(), dir.path(), Duration::from_secs(8));
    match host_kvm_obstacle() {
        // Real VT-x/AMD-V: the probe guest boots and prints its marker.
        None => assert_eq!(verdict, Ok(())),
        // This kind of host (e.g. the PVM software hypervisor): KVM_CREATE_VM works, yet a stock
        // kernel makes no progress, which the probe must notice within its deadline.
        Some(reason) => {
            let err = verdict.expect_err(&format!(
                "KVM here is unusable ({reason}) yet the probe passed"
            ));
            assert!(
                err.contains("no progress") || err.contains("exited"),
                "the probe explains itself: {err}"
            );
        }
    }
}

#[test]
fn auto_mode_falls_back_to_tcg_with_a_reason_and_caches_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = QemuEngine::default();
    let first = decide(AccelChoice::Auto, &engine, &assets(), dir.path()).unwrap();
    match host_kvm_obstacle() {
        Some(_) => {
            assert_eq!(first.accel, Accel::Tcg);
            assert!(
                first.fallback_reason.is_some(),
                "a fallback names its reason"
            );
        }
        None => assert!(first.accel == Accel::Kvm || first.fallback_reason.is_some()),
    }
    assert!(
        dir.path().join("accel.json").exists(),
        "the verdict is cached for this boot"
    );
    let again = decide(AccelChoice::Auto, &engine, &assets(), dir.path()).unwrap();
    assert_eq!(again, first);

    let forced = decide(AccelChoice::Tcg, &engine, &assets(), dir.path()).unwrap();
    assert_eq!(
        (forced.accel, forced.fallback_reason),
        (Accel::Tcg, None),
        "--accel tcg: no warning"
    );
}
