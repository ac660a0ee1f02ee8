//! Box disks through the real CLI, checked the way a user would with `du`, `qemu-img` and
//! `sha256sum`: a new Box costs well under a MiB (a qcow2 overlay over the image's shared raw
//! base, backing format recorded, relative backing name), twenty Boxes share one base, a running
//! Box never changes the base, `system df` accounts for it all and `image prune` removes only
//! base disks that nothing refers to.

mod support;

use support::{allocated, assert_qcow2_clean, backing_chain, sha256_file, Env};

const MIB: u64 = 1 << 20;

fn assert_thin_overlay_over_raw(env: &Env, name: &str) {
    let disk = env.disk_of(name);
    let bytes = allocated(&disk);
    assert!(
        bytes < MIB,
        "{name}: disk takes {bytes} bytes right after create"
    );
    assert_qcow2_clean(&disk);

    let chain = backing_chain(&disk);
    assert_eq!(chain.len(), 2, "{name}: overlay over base: {chain:#?}");
    let (top, base) = (&chain[0], &chain[1]);
    assert_eq!(top["format"], "qcow2");
    assert_eq!(
        top["backing-filename-format"], "raw",
        "the backing format is recorded, never probed"
    );
    let backing = top["backing-filename"].as_str().unwrap();
    assert!(
        !backing.starts_with('/') && backing.contains("images/rootfs/"),
        "relative backing name: {backing}"
    );
    assert_eq!(base["format"], "raw");
    let base_path = std::fs::canonicalize(base["filename"].as_str().unwrap()).unwrap();
    let bases: Vec<_> = env
        .base_disks()
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap())
        .collect();
    assert!(
        bases.contains(&base_path),
        "the base {base_path:?} is an image's file under images/rootfs: {bases:?}"
    );
}

#[test]
fn a_new_box_disk_is_a_thin_qcow2_over_the_shared_raw_base_for_busybox_and_debian() {
    let env = Env::new();
    let busybox = env.busybox();
    env.ok(&["create", "--name", "bb", busybox]);
    assert_eq!(env.base_disks().len(), 1);
    assert_thin_overlay_over_raw(&env, "bb");

    let debian = env.debian();
    env.ok(&["create", "--name", "deb", debian]);
    assert_eq!(env.base_disks().len(), 2, "one base per image");
    assert_thin_overlay_over_raw(&env, "deb");
    let base = backing_chain(&env.disk_of("deb"))[1]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        allocated(std::path::Path::new(&base)) > 50 * MIB,
        "the Debian base holds the whole image"
    );
}

#[test]
fn twenty_boxes_of_one_image_share_one_base_and_take_little_space() {
    let env = Env::new();
    let img = env.busybox();
    for i in 0..20 {
        env.ok(&["create", "--name", &format!("b{i}"), img, "true"]);
    }
    assert_eq!(env.base_disks().len(), 1, "{:?}", env.base_disks());
    let total: u64 = (0..20)
        .map(|i| allocated(&env.disk_of(&format!("b{i}"))))
        .sum();
    assert!(total < 20 * MIB, "20 Box disks take {total} bytes");

    let df: serde_json::Value = serde_json::from_str(&env.ok(&["system", "df", "--json"])).unwrap();
    let boxes = df["boxes"].as_array().unwrap();
    assert_eq!(boxes.len(), 20);
    let reported: u64 = boxes
        .iter()
        .map(|b| b["disk_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(reported, total, "df reports what du sees");
    assert_eq!(df["images"]["base_disks"], 1);
    let base_bytes = allocated(&env.base_disks()[0]);
    assert_eq!(
        df["images"]["base_disks_bytes"].as_u64().unwrap(),
        base_bytes
    );
    assert!(df["images"]["blobs_bytes"].as_u64().unwrap() > 0);
    assert_eq!(df["reclaimable_bytes"], 0, "every base is in use");
    let text = env.ok(&["system", "df"]);
    assert!(text.contains("Box disks") && text.contains("b19"), "{text}");
}

#[test]
fn a_running_box_writes_only_its_overlay_and_gets_the_gateway_as_dns() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["create", "--name", "w", img, "sleep", "100000"]);
    let base = env.base_disks().pop().unwrap();
    let before = sha256_file(&base);

    env.ok(&["start", "w"]);
    let resolv = env.ok(&["exec", "w", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv
            .lines()
            .any(|l| l.trim() == "nameserver 192.168.127.1"),
        "{resolv}"
    );
    env.ok(&[
        "exec",
        "w",
        "sh",
        "-c",
        "dd if=/dev/urandom of=/root/big bs=1M count=8 2>/dev/null && rm /bin/true && sync",
    ]);
    env.ok(&["stop", "w"]);

    assert_eq!(
        sha256_file(&base),
        before,
        "the shared base is never written"
    );
    let disk = env.disk_of("w");
    assert_qcow2_clean(&disk);
    assert!(allocated(&disk) > 8 * MIB, "the writes went to the overlay");
}

#[test]
fn image_prune_removes_a_base_disk_only_when_no_image_and_no_box_needs_it() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["create", "--name", "user", img]);
    let base = env.base_disks().pop().unwrap();

    // The image cannot go while a Box stands on it; prune keeps its base.
    assert_ne!(env.run(&["image", "rm", img]).status.code(), Some(0));
    env.ok(&["image", "prune"]);
    assert!(base.exists(), "prune removed a base disk a Box needs");
    let df: serde_json::Value = serde_json::from_str(&env.ok(&["system", "df", "--json"])).unwrap();
    assert_eq!(df["reclaimable_bytes"], 0);

    // A clone's frozen layer stays while the clone exists.
    env.ok(&["clone", "user", "twin"]);
    env.ok(&["rm", "user"]);
    env.ok(&["image", "prune"]);
    assert!(base.exists());
    assert_qcow2_clean(&env.disk_of("twin"));
    assert_eq!(backing_chain(&env.disk_of("twin")).len(), 3);

    // No Box left, but the image still names its base; the clone layer nothing needs goes.
    env.ok(&["rm", "twin"]);
    env.ok(&["image", "prune"]);
    assert!(base.exists(), "prune removed the base disk of a live image");
    let layers = env.home.path().join("boxes/.layers");
    let left = std::fs::read_dir(&layers).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "unreferenced clone layers stay after prune");

    // A base disk no image names (a --rootfs directory's) goes once its last Box is gone.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), "hi").unwrap();
    env.ok(&[
        "create",
        "--name",
        "dirbox",
        "--rootfs",
        dir.path().to_str().unwrap(),
        img,
    ]);
    let dir_base = env
        .base_disks()
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("dir-"))
        .expect("a base disk for the directory");
    env.ok(&["image", "prune"]);
    assert!(dir_base.exists(), "prune removed a base disk a Box needs");
    env.ok(&["rm", "dirbox"]);
    let df: serde_json::Value = serde_json::from_str(&env.ok(&["system", "df", "--json"])).unwrap();
    assert_eq!(
        df["reclaimable_bytes"].as_u64().unwrap(),
        allocated(&dir_base)
    );
    let out = env.ok(&["image", "prune"]);
    assert!(out.contains(&*dir_base.to_string_lossy()), "{out}");
    assert!(
        !dir_base.exists(),
        "an unreferenced base disk stays after prune"
    );
    assert_eq!(
        env.base_disks(),
        vec![base.clone()],
        "the image's base stays"
    );
}

#[test]
fn a_stopped_box_disk_grows_on_request_and_its_filesystem_follows() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&[
        "create",
        "--name",
        "grower",
        "--disk-size",
        "1G",
        img,
        "sleep",
        "1000",
    ]);
    let out = env.run(&["resize", "grower", "512M"]);
    assert_ne!(out.status.code(), Some(0), "shrinking is refused");

    env.ok(&["resize", "grower", "3G"]);
    env.ok(&["start", "grower"]);
    let out = env.run(&["resize", "grower", "4G"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a running Box's disk is not resized"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("grower"));

    let df = env.ok(&["exec", "grower", "df", "-k", "/"]);
    let total_kib: u64 = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        total_kib > 2_800_000 && total_kib < 3_200_000,
        "root filesystem follows the disk: {df}"
    );
    env.ok(&["rm", "-f", "grower"]);
}
