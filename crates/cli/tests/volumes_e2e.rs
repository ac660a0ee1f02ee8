//! Named volumes through the real CLI and real guests (QEMU under TCG here): data outlives its
//! Box, one writer at a time, leases freed however a Box ends (stop, `rm -f`, a killed VMM, a
//! killed shim), snapshots revert, backing volumes keep their children's writes apart, and a
//! VM killed mid-write leaves a volume `qemu-img check` passes and a new Box mounts.
//! Needs qemu-utils (`qemu-img`).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Env;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `boxlite ARGS`, asserting it fails as a user error (exit 125); returns stderr.
fn refused(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert_eq!(
        out.status.code(),
        Some(125),
        "boxlite {args:?} should be refused: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn volumes(env: &Env) -> Vec<serde_json::Value> {
    serde_json::from_str(&env.ok(&["volume", "ls", "--json"])).unwrap()
}

/// `(box id, read-write)` of every Box holding volume `name`.
fn holders(env: &Env, name: &str) -> Vec<(String, bool)> {
    let all = volumes(env);
    let volume = all
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {all:?}"));
    volume["in_use_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["box_id"].as_str().unwrap().to_string(),
                h["read_write"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn volume_file(env: &Env, name: &str) -> PathBuf {
    env.home
        .path()
        .join("volumes")
        .join(name)
        .join("volume.qcow2")
}

/// `qemu-img check` reports no errors and no leaked clusters on every volume of `env`.
fn check_every_volume(env: &Env) {
    for v in volumes(env) {
        let path = v["path"].as_str().unwrap();
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", path])
            .output()
            .expect("qemu-img (qemu-utils) runs");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("No errors were found"),
            "qemu-img check {path} ({}): {stdout}{}",
            out.status,
            text(&out.stderr)
        );
    }
}

fn box_field(env: &Env, name: &str, field: &str) -> serde_json::Value {
    env.state_of(name)[field].clone()
}

fn pid_gone(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty()
        || stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill9(pid: i64) {
    // SAFETY: plain kill(2) of a pid read from `boxlite ls --json` a moment ago.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn exec_ok(env: &Env, name: &str, script: &str) -> String {
    env.ok(&["exec", name, "sh", "-c", script])
}

#[test]
fn a_volume_outlives_its_box_has_one_writer_and_is_freed_by_stop_and_rm_force() {
    let env = Env::new();
    let img = env.busybox();

    env.ok(&["volume", "create", "data", "--size", "1G"]);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(volume_file(&env, "data"))
        .unwrap()
        .blocks()
        * 512;
    assert!(allocated < 2 << 20, "a fresh 1G volume takes {allocated} B");

    // The first Box formats it on first use and writes.
    let writer = env
        .ok(&[
            "run",
            "-d",
            "--name",
            "writer",
            "-v",
            "data:/data",
            img,
            "sleep",
            "1000",
        ])
        .trim()
        .to_string();
    let out = exec_ok(
        &env,
        "writer",
        "cd /data && dd if=/dev/urandom of=blob bs=1M count=8 2>/dev/null && \
         sha256sum blob > blob.sha && echo hello > hello && sync && \
         grep /data /proc/mounts | cut -d' ' -f3,4 | cut -d, -f1 && df -k /data | tail -1",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ext4 rw"), "{out}");
    let total_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("df output: {out}"));
    assert!(
        (900_000..=1_048_576).contains(&total_kib),
        "a 1G volume gives a ~1G filesystem, not {total_kib} KiB"
    );
    assert_eq!(holders(&env, "data"), vec![(writer.clone(), true)]);

    // While it runs, nobody else attaches it (read-write or read-only), and the volume can be
    // neither removed nor snapshotted; the errors name the volume and the Box holding it.
    let stderr = refused(
        &env,
        &[
            "run",
            "-d",
            "--name",
            "thief",
            "-v",
            "data:/data",
            img,
            "sleep",
            "1000",
        ],
    );
    assert!(
        stderr.contains("volume data is attached read-write to running box writer"),
        "{stderr}"
    );
    let stderr = refused(&env, &["run", "--rm", "-v", "data:/d:ro", img, "true"]);
    assert!(
        stderr.contains("volume data") && stderr.contains("writer"),
        "{stderr}"
    );
    let thief = box_field(&env, "thief", "exit_reason");
    assert!(
        thief.as_str().is_some_and(|r| r.contains("volume data")),
        "the refused Box says why: {thief}"
    );
    assert_eq!(
        holders(&env, "data"),
        vec![(writer.clone(), true)],
        "a refused Box holds nothing"
    );
    let stderr = refused(&env, &["volume", "rm", "data"]);
    assert!(
        stderr.contains("volume data is in use by box writer"),
        "the refusal names the Box, not its id: {stderr}"
    );
    let stderr = refused(&env, &["volume", "snapshot", "data", "s"]);
    assert!(
        stderr.contains("volume data is in use by box writer"),
        "{stderr}"
    );

    // Stopped: the lease is gone and the disk is clean; the Box is removed.
    env.ok(&["stop", "writer"]);
    assert_eq!(holders(&env, "data"), vec![]);
    check_every_volume(&env);
    env.ok(&["rm", "writer", "thief"]);

    // Two new Boxes read it at once, read-only: the data is there, byte-exact; writes are
    // refused; a writer is refused while they hold it.
    let readers: Vec<_> = ["r1", "r2"]
        .map(|name| {
            let cmd = env
                .cmd()
                .args(["run", "-d", "--name", name, "-v", "data:/data:ro", img])
                .args(["sleep", "1000"])
                .output();
            std::thread::spawn(move || cmd)
        })
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    for out in &readers {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for name in ["r1", "r2"] {
        assert_eq!(
            exec_ok(&env, name, "cd /data && sha256sum -c blob.sha && cat hello"),
            "blob: OK\nhello\n"
        );
        let out = env.run(&["exec", name, "sh", "-c", "echo x > /data/x"]);
        assert!(
            !out.status.success() && text(&out.stderr).contains("Read-only file system"),
            "{}",
            text(&out.stderr)
        );
    }
    let mut held = holders(&env, "data");
    held.sort();
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|(_, rw)| !rw), "{held:?}");
    let stderr = refused(&env, &["run", "--rm", "-v", "data:/data", img, "true"]);
    assert!(
        stderr.contains("volume data is attached read-only to running box r"),
        "{stderr}"
    );

    // rm -f kills them; their leases go with them and the volume can be removed.
    env.ok(&["rm", "-f", "r1", "r2"]);
    assert_eq!(holders(&env, "data"), vec![]);
    check_every_volume(&env);
    env.ok(&["volume", "rm", "data"]);
    assert!(!env.home.path().join("volumes/data").exists());

    // As with docker, `-v NAME:/path` creates a missing volume; it outlives the --rm Box.
    env.ok(&[
        "run",
        "--rm",
        "-v",
        "fresh:/f",
        img,
        "sh",
        "-c",
        "echo kept > /f/note",
    ]);
    assert_eq!(holders(&env, "fresh"), vec![]);
    let out = env.ok(&["run", "--rm", "-v", "fresh:/f:ro", img, "cat", "/f/note"]);
    assert_eq!(out, "kept\n");
    // A missing volume asked read-only is refused before anything is created.
    let stderr = refused(&env, &["create", "-v", "nothing:/n:ro", img, "true"]);
    assert!(
        stderr.contains("no volume named nothing"),
        "the error names the volume: {stderr}"
    );
    assert!(volumes(&env).iter().all(|v| v["name"] != "nothing"));
    check_every_volume(&env);
}

#[test]
fn snapshots_revert_and_backing_volumes_keep_their_children_apart() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["volume", "create", "base", "--size", "256M"]);

    let first = env.ok(&[
        "run",
        "--rm",
        "-v",
        "base:/v",
        img,
        "sh",
        "-c",
        "cd /v && dd if=/dev/urandom of=a bs=64k count=32 2>/dev/null && echo first > note && \
         sha256sum a note > sums && cat sums",
    ]);
    assert_eq!(first.lines().count(), 2, "{first}");
    env.ok(&["volume", "snapshot", "base", "s1"]);
    let snaps: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "snapshots", "base", "--json"])).unwrap();
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    check_every_volume(&env);

    // More writes after the snapshot: the data really changes.
    let second = env.ok(&[
        "run",
        "--rm",
        "-v",
        "base:/v",
        img,
        "sh",
        "-c",
        "cd /v && dd if=/dev/urandom of=a bs=64k count=32 2>/dev/null && echo second > note && \
         echo later > b && sha256sum a note",
    ]);
    assert_ne!(second, first);
    check_every_volume(&env);

    env.ok(&["volume", "revert", "base", "s1"]);
    check_every_volume(&env);

    // Two volumes over `base`, which is now frozen: no revert, no writer, no removal.
    env.ok(&["volume", "create", "left", "--backing", "base"]);
    env.ok(&["volume", "create", "right", "--backing", "base"]);
    let stderr = refused(&env, &["volume", "revert", "base", "s1"]);
    assert!(stderr.contains("backing volume of left, right"), "{stderr}");
    let stderr = refused(&env, &["run", "--rm", "-v", "base:/b", img, "true"]);
    assert!(
        stderr.contains("volume base") && stderr.contains("read-only"),
        "{stderr}"
    );
    let base_file = volume_file(&env, "base");
    let base_before = std::fs::read(&base_file).unwrap();

    // The reverted base (read-only) and both children show the snapshot's content, checked by
    // sha256 in the guest; each child then takes a write of its own.
    let out = env.ok(&[
        "run",
        "--rm",
        "-v",
        "base:/base:ro",
        "-v",
        "left:/l",
        "-v",
        "right:/r",
        img,
        "sh",
        "-c",
        "for d in /base /l /r; do (cd $d && sha256sum -c sums && cat note && \
         test ! -e b && echo no-b) || exit 1; done; \
         echo left-only > /l/mine && echo right-only > /r/mine && sync",
    ]);
    assert_eq!(
        out,
        "a: OK\nnote: OK\nfirst\nno-b\n".repeat(3),
        "the snapshot's content"
    );

    // A new Box sees each child's write in that child only, and the base untouched.
    let out = env.ok(&[
        "run",
        "--rm",
        "-v",
        "base:/base:ro",
        "-v",
        "left:/l",
        "-v",
        "right:/r",
        img,
        "sh",
        "-c",
        "cat /l/mine /r/mine; test ! -e /base/mine && echo base-clean; \
         cd /l && sha256sum -c /base/sums",
    ]);
    assert_eq!(out, "left-only\nright-only\nbase-clean\na: OK\nnote: OK\n");
    assert!(
        std::fs::read(&base_file).unwrap() == base_before,
        "the backing file did not change by a byte"
    );
    check_every_volume(&env);

    let stderr = refused(&env, &["volume", "rm", "base"]);
    assert!(stderr.contains("backing volume of left, right"), "{stderr}");
    env.ok(&["volume", "rm", "left"]);
    env.ok(&["volume", "rm", "right"]);
    env.ok(&["volume", "rm", "base"]);
}

#[test]
fn a_vm_killed_mid_write_leaves_a_clean_volume_and_a_killed_shim_frees_its_lease() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["volume", "create", "crash", "--size", "512M"]);

    // A write loop: each file is synced, then its checksum appended to a log and synced.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "victim",
        "-v",
        "crash:/d",
        img,
        "sh",
        "-c",
        "cd /d; i=0; while true; do \
         dd if=/dev/urandom of=f$i bs=64k count=8 conv=fsync 2>/dev/null; \
         sha256sum f$i >> log; sync; i=$((i+1)); done",
    ]);
    wait_until("three files written", Duration::from_secs(120), || {
        let out = env.run(&["exec", "victim", "sh", "-c", "wc -l < /d/log"]);
        text(&out.stdout).trim().parse::<u32>().unwrap_or(0) >= 3
    });
    let vmm = box_field(&env, "victim", "vmm_pid").as_i64().unwrap();
    kill9(vmm);
    wait_until(
        "the Box to be recorded exited",
        Duration::from_secs(30),
        || box_field(&env, "victim", "state") == "exited",
    );
    assert!(
        box_field(&env, "victim", "exit_reason")
            .as_str()
            .is_some_and(|r| r.contains("signal 9")),
        "{}",
        env.state_of("victim")
    );
    assert_eq!(
        holders(&env, "crash"),
        vec![],
        "the shim released the lease"
    );
    check_every_volume(&env);

    // A new Box mounts it (ext4 replays its journal): every file the log vouches for is intact.
    let verify = "cd /d && grep -E '^[0-9a-f]{64}  f[0-9]+$' log > done && \
                  n=$(wc -l < done) && sha256sum -c done >/dev/null && echo verified $n";
    env.ok(&[
        "run", "-d", "--name", "second", "-v", "crash:/d", img, "sleep", "1000",
    ]);
    let out = exec_ok(&env, "second", verify);
    let verified: u32 = out
        .trim()
        .strip_prefix("verified ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(verified >= 3, "{out}");
    exec_ok(&env, "second", "echo after-crash > /d/after && sync");

    // Its shim killed: the VMM dies with it; the lease is released as soon as anyone looks.
    let shim = box_field(&env, "second", "shim_pid").as_i64().unwrap();
    let vmm = box_field(&env, "second", "vmm_pid").as_i64().unwrap();
    kill9(shim);
    wait_until(
        "the VMM to die with its shim",
        Duration::from_secs(30),
        || pid_gone(vmm),
    );
    assert_eq!(holders(&env, "crash"), vec![]);
    assert_eq!(box_field(&env, "second", "state"), "exited");
    check_every_volume(&env);

    // And it mounts once more, everything still there.
    let out = env.ok(&[
        "run",
        "--rm",
        "-v",
        "crash:/d",
        img,
        "sh",
        "-c",
        &format!("{verify}; cat /d/after"),
    ]);
    assert!(
        out.starts_with("verified ") && out.ends_with("after-crash\n"),
        "{out}"
    );
    check_every_volume(&env);
    env.ok(&["rm", "victim", "second"]);
    env.ok(&["volume", "rm", "crash"]);
}
