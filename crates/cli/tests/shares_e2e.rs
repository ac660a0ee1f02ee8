//! Host folder and file shares (`-v HOST:GUEST[:ro]`) through the real CLI and a real guest
//! (QEMU under TCG here, one virtiofsd per share): changes show on the other side at once, `:ro`
//! holds even against a guest root that remounts read-write (virtiofsd refuses on the host),
//! single files are shared alone, ownership passes through, and as many shares as the machine
//! has device slots work in one Box. Needs virtiofsd (`scripts/setup-virtiofsd.sh`).

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use sha2::{Digest, Sha256};
use support::{processes_mentioning, Env};

/// Folder shares on top of the four special ones: 4 + 23 = 27, every slot a Box with a network
/// card has (30 PCI slots minus the agent port, the root disk and the NIC).
const MANY: usize = 23;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `boxlite exec BOX sh -c SCRIPT` (as `user` when given).
fn sh(env: &Env, user: Option<&str>, name: &str, script: &str) -> Output {
    let mut args = vec!["exec"];
    if let Some(u) = user {
        args.extend(["-u", u]);
    }
    args.extend([name, "sh", "-c", script]);
    env.run(&args)
}

/// Like [`sh`], asserting success; returns stdout.
fn sh_ok(env: &Env, name: &str, script: &str) -> String {
    let out = sh(env, None, name, script);
    assert!(
        out.status.success(),
        "{script:?} failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts that `script` fails in the guest because the filesystem refuses the write.
fn assert_write_refused(env: &Env, name: &str, script: &str) {
    let out = sh(env, None, name, script);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && (stderr.contains("Read-only file system") || stderr.contains("Permission denied")),
        "{script:?} should fail with EROFS/EACCES ({}): {stderr}",
        out.status
    );
}

/// The guest reads `rw/edited.txt`, the host rewrites it with `contents` the moment the guest
/// signals, and the guest reads it again as soon as the host signals back; returns what the
/// guest read, both times.
fn reread_after_host_rewrite(env: &Env, rw: &Path, contents: &str) -> String {
    let script = "cat /mnt/rw/edited.txt; echo > /mnt/rw/ready; \
                  while [ ! -e /mnt/rw/go ]; do usleep 1000; done; cat /mnt/rw/edited.txt";
    let guest = env
        .cmd()
        .args(["exec", "sharer", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !rw.join("ready").exists() {
        assert!(
            started.elapsed().as_secs() < 120,
            "the guest never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::write(rw.join("edited.txt"), contents).unwrap();
    std::fs::write(rw.join("go"), "").unwrap();
    let out = guest.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_file(rw.join("ready")).unwrap();
    std::fs::remove_file(rw.join("go")).unwrap();
    text(&out.stdout)
}

#[test]
fn shares_are_live_both_ways_read_only_is_enforced_on_the_host_and_27_fit_in_one_box() {
    let env = Env::new();
    let img = env.busybox();
    let host = tempfile::Builder::new()
        .prefix("shares")
        .tempdir_in("/tmp")
        .unwrap();
    let h = host.path();
    let (rw, ro, conf) = (h.join("rw"), h.join("ro"), h.join("conf"));
    for dir in [&rw, &ro, &conf] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(ro.join("keep.txt"), "keep\n").unwrap();
    std::fs::write(rw.join("edited.txt"), "one\n").unwrap();
    std::fs::write(rw.join("doomed.txt"), "doomed\n").unwrap();
    std::fs::write(conf.join("app.conf"), "color=blue\n").unwrap();
    std::fs::write(conf.join("secret.conf"), "token=1\n").unwrap();
    std::fs::write(conf.join("private.key"), "never in the guest\n").unwrap();
    let mut args: Vec<String> = ["run", "-d", "--name", "sharer"].map(String::from).to_vec();
    let mut mount = |spec: String| args.extend(["-v".to_string(), spec]);
    mount(format!("{}:/mnt/rw", rw.display()));
    mount(format!("{}:/mnt/ro:ro", ro.display()));
    mount(format!("{}:/etc/app.conf", conf.join("app.conf").display()));
    mount(format!(
        "{}:/etc/secret.conf:ro",
        conf.join("secret.conf").display()
    ));
    for i in 0..MANY {
        let dir = h.join(format!("many{i:02}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("id"), format!("{i}\n")).unwrap();
        mount(format!("{}:/many/{i:02}", dir.display()));
    }
    args.extend([img, "sleep", "1000"].map(String::from));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = env.ok(&arg_refs).trim().to_string();

    // Every share is mounted, and each shows its own folder.
    assert_eq!(
        sh_ok(&env, "sharer", "grep -c ' virtiofs ' /proc/mounts").trim(),
        (4 + MANY).to_string()
    );
    let ids = sh_ok(&env, "sharer", "cat /many/*/id | sort -n | tr '\\n' ' '");
    let expected: String = (0..MANY).map(|i| format!("{i} ")).collect();
    assert_eq!(ids, expected);

    // Host to guest, at once: a file the guest has just read, rewritten longer by the host, reads
    // whole at once (a guest that kept the old size for a while would read it cut short).
    assert_eq!(
        reread_after_host_rewrite(&env, &rw, "one, then two and three\n"),
        "one\none, then two and three\n"
    );
    // A new file, a deleted file, and 8 MiB byte-exact.
    std::fs::write(rw.join("new.txt"), "from the host\n").unwrap();
    std::fs::remove_file(rw.join("doomed.txt")).unwrap();
    let blob: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(rw.join("blob"), &blob).unwrap();
    assert_eq!(
        sh_ok(
            &env,
            "sharer",
            "cat /mnt/rw/new.txt; test -e /mnt/rw/doomed.txt || echo gone; \
             sha256sum /mnt/rw/blob | cut -d' ' -f1"
        ),
        format!("from the host\ngone\n{}\n", sha256_hex(&blob))
    );

    // Guest to host, at once: files, folders, renames, removals, 8 MiB byte-exact.
    let guest_sha = sh_ok(
        &env,
        "sharer",
        "echo from the guest > /mnt/rw/g.txt && mkdir -p /mnt/rw/d/e && echo deep > /mnt/rw/d/e/f \
         && echo moved > /mnt/rw/m1 && mv /mnt/rw/m1 /mnt/rw/m2 && rm /mnt/rw/new.txt \
         && dd if=/dev/urandom of=/mnt/rw/gblob bs=1M count=8 2>/dev/null \
         && sha256sum /mnt/rw/gblob | cut -d' ' -f1",
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("g.txt")).unwrap(),
        "from the guest\n"
    );
    assert_eq!(std::fs::read_to_string(rw.join("d/e/f")).unwrap(), "deep\n");
    assert_eq!(std::fs::read_to_string(rw.join("m2")).unwrap(), "moved\n");
    assert!(!rw.join("m1").exists() && !rw.join("new.txt").exists());
    assert_eq!(
        sha256_hex(&std::fs::read(rw.join("gblob")).unwrap()),
        guest_sha.trim()
    );

    // Ownership passes through as numbers (virtiofsd runs as root here): the guest's root makes
    // root's files, a guest user its own, chown reaches the host, host owners show in the guest.
    let meta = std::fs::metadata(rw.join("g.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "guest root writes as root"
    );
    let open = rw.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = sh(
        &env,
        Some("1000:1000"),
        "sharer",
        "echo mine > /mnt/rw/open/u.txt && touch /mnt/rw/not-mine",
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("Permission denied"),
        "a guest user cannot write into root's 0755 folder: {}",
        text(&out.stderr)
    );
    let meta = std::fs::metadata(open.join("u.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    sh_ok(&env, "sharer", "chown 2000:3000 /mnt/rw/g.txt");
    let meta = std::fs::metadata(rw.join("g.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (2000, 3000));
    std::os::unix::fs::chown(rw.join("edited.txt"), Some(4321), Some(4322)).unwrap();
    assert_eq!(
        sh_ok(&env, "sharer", "stat -c %u:%g /mnt/rw/edited.txt"),
        "4321:4322\n"
    );

    // `:ro` is refused in the guest, and still refused by virtiofsd once the guest's root
    // remounts the share read-write.
    assert_write_refused(&env, "sharer", "echo x > /mnt/ro/new");
    assert_write_refused(&env, "sharer", "echo x >> /mnt/ro/keep.txt");
    assert_write_refused(&env, "sharer", "rm /mnt/ro/keep.txt");
    let remount = sh(&env, None, "sharer", "mount -o remount,rw /mnt/ro");
    eprintln!(
        "guest remount of the read-only share read-write: {} {}",
        remount.status,
        text(&remount.stderr)
    );
    assert_write_refused(&env, "sharer", "echo x > /mnt/ro/new");
    assert_write_refused(&env, "sharer", "mkdir /mnt/ro/dir");
    assert_write_refused(&env, "sharer", "rm /mnt/ro/keep.txt");
    assert_eq!(
        std::fs::read_dir(&ro).unwrap().count(),
        1,
        "nothing appeared in or vanished from the read-only folder"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("keep.txt")).unwrap(),
        "keep\n"
    );
    let daemons = processes_mentioning(&id);
    let ro_arg = format!("--shared-dir {} ", ro.display());
    let ro_daemons: Vec<&String> = daemons.iter().filter(|p| p.contains(&ro_arg)).collect();
    assert!(!ro_daemons.is_empty(), "no virtiofsd for {}", ro.display());
    assert!(
        ro_daemons.iter().all(|p| p.contains("--readonly")),
        "{ro_daemons:?}"
    );

    // A single file, shared read-write, alone: read, written through both ways, and its
    // siblings (and the share's staging mount) are nowhere in the guest.
    assert_eq!(sh_ok(&env, "sharer", "cat /etc/app.conf"), "color=blue\n");
    sh_ok(&env, "sharer", "echo color=green > /etc/app.conf");
    assert_eq!(
        std::fs::read_to_string(conf.join("app.conf")).unwrap(),
        "color=green\n"
    );
    std::fs::write(conf.join("app.conf"), "color=a much longer red\n").unwrap();
    assert_eq!(
        sh_ok(&env, "sharer", "cat /etc/app.conf"),
        "color=a much longer red\n"
    );
    assert_eq!(
        sh_ok(
            &env,
            "sharer",
            "find /etc /mnt /many /dev -name private.key; grep -c boxlite-share /proc/mounts; true"
        ),
        "0\n"
    );
    // A single file, shared read-only: read, never written, not even after a remount.
    assert_eq!(sh_ok(&env, "sharer", "cat /etc/secret.conf"), "token=1\n");
    assert_write_refused(&env, "sharer", "echo token=2 > /etc/secret.conf");
    let _ = sh(
        &env,
        None,
        "sharer",
        "mount -o remount,rw,bind /etc/secret.conf",
    );
    assert_write_refused(&env, "sharer", "echo token=2 > /etc/secret.conf");
    assert_eq!(
        std::fs::read_to_string(conf.join("secret.conf")).unwrap(),
        "token=1\n"
    );
    assert_eq!(
        std::fs::metadata(conf.join("app.conf")).unwrap().nlink(),
        2,
        "a running single-file share holds a hard link in the Box's folder"
    );

    // Stopped: every virtiofsd is gone, the host files keep the guest's last writes, and the
    // single-file staging links are removed.
    env.ok(&["stop", "sharer"]);
    assert_eq!(processes_mentioning(&id), Vec::<String>::new());
    assert_eq!(std::fs::read_to_string(rw.join("d/e/f")).unwrap(), "deep\n");
    for file in ["app.conf", "secret.conf"] {
        assert_eq!(
            std::fs::metadata(conf.join(file)).unwrap().nlink(),
            1,
            "{file}"
        );
    }
    env.ok(&["rm", "sharer"]);
}

#[test]
fn bad_shares_are_refused_before_boot_naming_the_culprit_and_leave_nothing_running() {
    let env = Env::new();
    let img = env.busybox();
    let host = tempfile::Builder::new()
        .prefix("badshares")
        .tempdir_in("/tmp")
        .unwrap();
    let (good, gone) = (host.path().join("good"), host.path().join("gone"));
    std::fs::create_dir(&good).unwrap();
    std::fs::create_dir(&gone).unwrap();

    // A folder that vanished between create and start: the share started before it is stopped.
    let id = env
        .ok(&[
            "create",
            "--name",
            "vanished",
            "-v",
            &format!("{}:/a", good.display()),
            "-v",
            &format!("{}:/b", gone.display()),
            img,
            "true",
        ])
        .trim()
        .to_string();
    std::fs::remove_dir(&gone).unwrap();
    let out = env.run(&["start", "vanished"]);
    assert_eq!(out.status.code(), Some(125));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&gone.display().to_string()), "{stderr}");
    assert_eq!(processes_mentioning(&id), Vec::<String>::new());
    let b = env.state_of("vanished");
    assert_eq!(b["state"], "exited");
    assert!(
        b["exit_reason"]
            .as_str()
            .is_some_and(|r| r.contains(&gone.display().to_string())),
        "{b}"
    );

    // More shares than the machine has slots: a clear refusal, not a QEMU crash.
    let mut args: Vec<String> = ["run", "--rm"].map(String::from).to_vec();
    for i in 0..28 {
        args.extend(["-v".into(), format!("{}:/m/{i}", good.display())]);
    }
    args.extend([img.to_string(), "true".to_string()]);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.run(&arg_refs);
    assert_eq!(out.status.code(), Some(125));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("too many -v mounts") && stderr.contains("room for 27"),
        "{stderr}"
    );

    // A single file on another filesystem cannot be hard-linked: read-write is refused.
    let shm = Path::new("/dev/shm");
    let other_fs = std::fs::metadata(shm).map(|m| m.dev()).ok()
        != std::fs::metadata(env.home.path()).map(|m| m.dev()).ok();
    if shm.is_dir() && other_fs {
        let file = tempfile::NamedTempFile::new_in(shm).unwrap();
        let out = env.run(&[
            "run",
            "--rm",
            "-v",
            &format!("{}:/etc/x.conf", file.path().display()),
            img,
            "true",
        ]);
        assert_eq!(out.status.code(), Some(125));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&file.path().display().to_string())
                && stderr.contains("another filesystem"),
            "{stderr}"
        );
    }
    env.ok(&["rm", "vanished"]);
}
