//! `boxlite snapshot …` and `boxlite clone` with real guests: a restored snapshot holds exactly
//! the files it was taken with (sha256 inside the guest), a clone starts from its source's files
//! and the two never see each other's later writes, and removing the source (then pruning)
//! leaves the clone whole. Boots are few: each costs seconds under TCG.

mod support;

use support::{assert_qcow2_clean, backing_chain, Env};

/// `sha256sum` of the test files inside the guest (a missing file shows as an error line).
const HASHES: &str = "cd /root && sha256sum a.bin b.txt 2>&1";

fn hashes(env: &Env, name: &str) -> String {
    let out = env.run(&["exec", name, "sh", "-c", HASHES]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inspect(env: &Env, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["inspect", name])).unwrap()
}

fn exists(env: &Env, name: &str, path: &str) -> bool {
    env.run(&["exec", name, "test", "-e", path])
        .status
        .success()
}

#[test]
fn snapshot_restore_brings_back_the_files_and_clones_keep_their_writes_apart() {
    let env = Env::new();
    let img = env.busybox();

    // Boot 1: write the files whose hashes the snapshot must bring back.
    env.ok(&["run", "-d", "--name", "src", img, "sleep", "100000"]);
    env.ok(&[
        "exec",
        "src",
        "sh",
        "-c",
        "dd if=/dev/urandom of=/root/a.bin bs=1k count=300 2>/dev/null && \
         echo original > /root/b.txt && sync",
    ]);
    let original = hashes(&env, "src");
    assert_eq!(original.lines().count(), 2, "{original}");
    assert!(!original.contains("No such file"), "{original}");

    // A running Box is refused, by name.
    for args in [
        &["snapshot", "create", "src", "s1"][..],
        &["snapshot", "restore", "src", "s1"],
        &["snapshot", "rm", "src", "s1"],
        &["clone", "src", "copy"],
    ] {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} on a running Box");
        assert!(
            stderr.contains("box src is running") && stderr.contains("stop it"),
            "{args:?}: {stderr}"
        );
    }
    env.ok(&["stop", "src"]);

    // Clone first (the disks then share a frozen layer), then snapshot the source.
    let clone_id = env.ok(&["clone", "src", "copy"]);
    assert_eq!(clone_id.trim().len(), 32, "clone prints the new Box id");
    let copy = inspect(&env, "copy");
    let src = inspect(&env, "src");
    assert_eq!(copy["state"], "created");
    assert_ne!(copy["id"], src["id"]);
    assert_ne!(copy["config"]["mac"], src["config"]["mac"]);
    assert_eq!(copy["config"]["cloned_from"], src["id"]);
    assert_eq!(
        copy["config"]["main"]["argv"],
        src["config"]["main"]["argv"]
    );
    let out = env.run(&["clone", "src", "copy"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("copy"));
    assert_ne!(out.status.code(), Some(0), "a clone name in use is refused");

    env.ok(&["snapshot", "create", "src", "s1"]);
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "src", "--json"])).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "s1");
    let out = env.run(&["snapshot", "create", "src", "s1"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a snapshot name in use is refused"
    );

    // Boot 2: change one file, delete the other, then go back to the snapshot.
    env.ok(&["start", "src"]);
    env.ok(&[
        "exec",
        "src",
        "sh",
        "-c",
        "echo changed > /root/a.bin && rm /root/b.txt && echo later > /root/later.txt && sync",
    ]);
    assert_ne!(hashes(&env, "src"), original);
    env.ok(&["stop", "src"]);
    env.ok(&["snapshot", "restore", "src", "s1"]);
    let out = env.run(&["snapshot", "restore", "src", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    assert_ne!(out.status.code(), Some(0));

    // Boots 3 and 4: both Boxes at once.
    env.ok(&["start", "src"]);
    env.ok(&["start", "copy"]);
    assert_eq!(
        hashes(&env, "src"),
        original,
        "restore brings back exactly s1"
    );
    assert!(
        !exists(&env, "src", "/root/later.txt"),
        "writes after s1 are gone"
    );
    assert_eq!(
        hashes(&env, "copy"),
        original,
        "the clone sees the source's files"
    );
    assert!(
        !exists(&env, "copy", "/root/later.txt"),
        "the source's writes after the clone do not reach it"
    );
    assert_eq!(
        env.ok(&["exec", "copy", "hostname"]).trim(),
        "copy",
        "the clone's hostname follows its name"
    );
    env.ok(&["exec", "src", "sh", "-c", "echo s > /root/src-only; sync"]);
    env.ok(&["exec", "copy", "sh", "-c", "echo c > /root/copy-only; sync"]);
    assert!(!exists(&env, "src", "/root/copy-only"));
    assert!(!exists(&env, "copy", "/root/src-only"));
    env.ok(&["stop", "src", "copy"]);

    // Snapshot removal.
    env.ok(&["snapshot", "rm", "src", "s1"]);
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "src", "--json"])).unwrap();
    assert!(listed.is_empty());

    // Removing the source and pruning leave the clone whole (its chain, its files).
    env.ok(&["rm", "src"]);
    env.ok(&["image", "prune"]);
    let disk = env.disk_of("copy");
    assert_qcow2_clean(&disk);
    let chain = backing_chain(&disk);
    assert_eq!(chain.len(), 3, "overlay, frozen layer, base: {chain:?}");
    assert_eq!(chain[2]["format"], "raw");
    // Boot 5.
    env.ok(&["start", "copy"]);
    assert_eq!(hashes(&env, "copy"), original);
    assert!(exists(&env, "copy", "/root/copy-only"));
    env.ok(&["rm", "-f", "copy"]);
}

#[test]
fn snapshot_commands_name_a_missing_box_or_a_bad_snapshot_name() {
    let env = Env::new();
    let img = env.busybox();
    let out = env.run(&["snapshot", "create", "ghost", "s1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));
    assert_ne!(out.status.code(), Some(0));

    env.ok(&["create", "--name", "quiet", img]);
    for bad in ["-x", "../up", "12", "a b"] {
        let out = env.run(&["snapshot", "create", "quiet", "--", bad]);
        assert_ne!(out.status.code(), Some(0), "snapshot name {bad:?} accepted");
    }
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "quiet", "--json"])).unwrap();
    assert!(listed.is_empty());
    let out = env.run(&["clone", "quiet", "bad/name"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad/name"));
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn a_clone_of_a_box_with_snapshots_carries_them_and_stays_independent() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["create", "--name", "orig", img]);
    env.ok(&["snapshot", "create", "orig", "base-state"]);
    env.ok(&["clone", "orig", "dup"]);

    let names = |name: &str| -> Vec<String> {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&env.ok(&["snapshot", "ls", name, "--json"])).unwrap();
        list.iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("dup"), vec!["base-state".to_string()]);
    let disk = env.disk_of("dup");
    assert_qcow2_clean(&disk);
    assert_eq!(
        backing_chain(&disk).len(),
        2,
        "a copied overlay over the base"
    );

    // Each Box's snapshots are its own from now on.
    env.ok(&["snapshot", "rm", "dup", "base-state"]);
    env.ok(&["snapshot", "create", "dup", "mine"]);
    assert_eq!(names("orig"), vec!["base-state".to_string()]);
    assert_eq!(names("dup"), vec!["mine".to_string()]);
    env.ok(&["rm", "orig"]);
    env.ok(&["snapshot", "restore", "dup", "mine"]);
    assert_qcow2_clean(&env.disk_of("dup"));
}
