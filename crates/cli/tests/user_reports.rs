//! What a user checks from the CLI for refusals and messages that need no guest boot: volumes in
//! use by Boxes that are not running, invalid mounts and sizes, image names and removal, error
//! messages of `image import` and `pull`.

mod support;

use support::Env;

/// Runs `boxlite ARGS`, asserting it fails; returns stderr.
fn fails(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(
        !out.status.success(),
        "boxlite {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn volume_rm_refuses_a_volume_that_a_created_box_uses() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["create", "--name", "v2", "-v", "d2:/data", img, "true"]);
    env.ok(&["create", "--name", "v3", "-v", "d2:/more:ro", img, "true"]);

    let err = fails(&env, &["volume", "rm", "d2"]);
    assert!(err.contains("volume d2 is in use by box v2, v3"), "{err}");
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "ls", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "d2", "the volume is still there");

    let table = env.ok(&["volume", "ls"]);
    let row = table.lines().find(|l| l.starts_with("d2 ")).unwrap();
    assert!(row.ends_with("v2(rw),v3(ro)"), "{table}");
    assert_eq!(list[0]["used_by"][0]["box_name"], "v2");
    assert_eq!(list[0]["used_by"][0]["running"], false);

    env.ok(&["rm", "v2", "v3"]);
    env.ok(&["volume", "rm", "d2"]);
}

#[test]
fn create_refuses_mounts_over_the_root_the_kernel_paths_or_each_other() {
    let env = Env::new();
    let img = env.busybox();
    let host = tempfile::tempdir().unwrap();
    let host = host.path().to_str().unwrap();

    for (spec, says) in [
        (format!("{host}:/"), "the destination / would hide"),
        ("d:/proc".to_string(), "under /proc"),
        ("d:/sys/kernel".to_string(), "under /sys"),
        (format!("{host}:/dev"), "under /dev"),
        ("d:data".to_string(), "must be an absolute path"),
    ] {
        let err = fails(&env, &["create", "-v", &spec, img, "true"]);
        assert!(err.contains(&format!("invalid -v \"{spec}\"")), "{err}");
        assert!(err.contains(says), "{spec}: {err}");
    }
    let err = fails(
        &env,
        &[
            "run",
            "-v",
            "d:/data",
            "-v",
            &format!("{host}:/data/"),
            img,
            "true",
        ],
    );
    assert!(err.contains("already mounts on /data"), "{err}");
    assert!(env.ls().is_empty(), "nothing was created");
    let volumes = env.ok(&["volume", "ls", "--json"]);
    assert_eq!(
        volumes.trim(),
        "[]",
        "no volume was created for a refused Box"
    );
}

#[test]
fn create_refuses_a_disk_smaller_than_the_image() {
    let env = Env::new();
    let img = env.busybox();

    let err = fails(
        &env,
        &["create", "--name", "tiny", "--disk-size", "1K", img],
    );
    assert!(err.contains("invalid --disk-size 1K"), "{err}");
    let minimum = err
        .split("needs at least ")
        .nth(1)
        .unwrap_or_else(|| panic!("names the minimum: {err}"))
        .trim()
        .to_string();
    assert!(env.ls().is_empty(), "nothing was created");

    env.ok(&["create", "--name", "fits", "--disk-size", &minimum, img]);
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "fits"])).unwrap();
    let stored = inspect["config"]["disk_size"].as_u64().unwrap();
    assert_eq!(boxlite::rootfs::size::parse_size(&minimum).unwrap(), stored);
}

#[test]
fn a_box_records_the_image_name_the_user_typed() {
    let env = Env::new();
    let layout = support::busybox_layout();
    let layout = layout.to_str().unwrap();
    let first = env.ok(&["image", "import", layout, "--tag", "localhost/armonly:1"]);
    let second = env.ok(&["image", "import", layout, "--tag", "localhost/busybox:demo"]);
    assert_eq!(first, second, "one image with two tags");

    env.ok(&["create", "--name", "c", "localhost/busybox:demo", "true"]);
    assert_eq!(env.state_of("c")["image"], "localhost/busybox:demo");
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "c"])).unwrap();
    assert_eq!(inspect["image"], "localhost/busybox:demo");
    assert_eq!(
        inspect["config"]["rootfs"]["reference"],
        "localhost/busybox:demo"
    );
    let table = env.ok(&["ls"]);
    assert!(table.contains("localhost/busybox:demo"), "{table}");
    assert!(!table.contains("armonly"), "{table}");

    // By id, the Box takes one of the image's names.
    let id = first.trim().trim_start_matches("sha256:")[..12].to_string();
    env.ok(&["create", "--name", "by-id", &id, "true"]);
    let image = env.state_of("by-id")["image"].as_str().unwrap().to_string();
    assert!(image.starts_with("localhost/"), "{image}");
}

#[test]
fn image_rm_by_id_of_a_twice_tagged_image_needs_force() {
    let env = Env::new();
    let layout = support::busybox_layout();
    let layout = layout.to_str().unwrap();
    let id = env.ok(&["image", "import", layout, "--tag", "localhost/a:1"]);
    env.ok(&["image", "import", layout, "--tag", "localhost/b:2"]);
    env.ok(&["image", "import", layout, "--tag", "localhost/c:3"]);
    let id = id.trim().to_string();
    let short = &id.trim_start_matches("sha256:")[..12];

    let err = fails(&env, &["image", "rm", short]);
    assert!(err.contains("several names"), "{err}");
    assert!(
        err.contains("localhost/a:1, localhost/b:2, localhost/c:3"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(env.ok(&["images"]).lines().count(), 4, "nothing removed");

    // One tag untags only that tag.
    let out = env.ok(&["image", "rm", "localhost/c:3"]);
    assert_eq!(out, "Untagged: localhost/c:3\n");
    let images = env.ok(&["images"]);
    assert!(images.contains("localhost/a:1") && images.contains("localhost/b:2"));

    let out = env.ok(&["image", "rm", "-f", short]);
    assert_eq!(
        out,
        format!("Untagged: localhost/a:1\nUntagged: localhost/b:2\nDeleted: {id}\n")
    );
    assert_eq!(env.ok(&["images", "--json"]).trim(), "[]");
}

/// The host's CPUs and memory in MiB.
fn host_size() -> (usize, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    (
        std::thread::available_parallelism().unwrap().get(),
        kib >> 10,
    )
}

#[test]
fn memory_takes_units_and_resources_stay_within_the_host() {
    let env = Env::new();
    let img = env.busybox();
    let (cpus, mib) = host_size();

    for (given, stored) in [("1G", 1024), ("768m", 768), ("256", 256)] {
        let name = format!("m{stored}");
        env.ok(&["create", "--name", &name, "--memory", given, img, "true"]);
        let inspect: serde_json::Value =
            serde_json::from_str(&env.ok(&["inspect", &name])).unwrap();
        assert_eq!(inspect["config"]["memory_mib"], stored, "--memory {given}");
    }

    let too_much = format!("{}", mib + 1);
    let err = fails(&env, &["create", "--memory", &too_much, img, "true"]);
    assert!(
        err.contains(&format!("the host has {mib} MiB of memory")),
        "{err}"
    );
    let err = fails(&env, &["run", "--memory", "1x", img, "true"]);
    assert!(err.contains("invalid --memory \"1x\""), "{err}");

    let err = fails(&env, &["create", "--cpus", &(cpus + 1).to_string(), img]);
    assert!(
        err.contains(&format!(
            "invalid --cpus {}: the host has {cpus} CPUs",
            cpus + 1
        )),
        "{err}"
    );
    env.ok(&[
        "create",
        "--name",
        "all-cpus",
        "--cpus",
        &cpus.to_string(),
        img,
    ]);
    assert_eq!(env.ls().len(), 4, "only the valid Boxes were created");
}

#[test]
fn start_reports_the_vmm_error_when_qemu_exits_at_once() {
    let env = Env::new();
    let img = env.busybox();
    env.ok(&["create", "--name", "big", img, "true"]);
    // A Box recorded with more memory than the host has (by an older boxlite, or on a host that
    // since shrank): QEMU refuses to allocate it and exits before the guest runs.
    let db = env.home.path().join("db/boxlite.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let changed = conn
        .execute(
            "UPDATE boxes SET config = json_set(config, '$.memory_mib', 100000000) \
             WHERE name = 'big'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);

    let err = fails(&env, &["start", "big"]);
    assert!(err.contains("cannot set up guest memory"), "{err}");
    assert!(!err.contains("agent"), "{err}");
}

#[test]
fn image_import_says_what_is_wrong_with_the_path_without_its_contents() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("passwd");
    std::fs::write(
        &text,
        "root:x:0:0:root:/root:/bin/bash\nlogin secret-line\n",
    )
    .unwrap();
    let text = text.to_str().unwrap();

    let err = fails(&env, &["image", "import", text]);
    assert!(
        err.contains(&format!(
            "{text} is not an image: not an OCI layout directory, an oci-archive tar or a \
             docker-save tar"
        )),
        "{err}"
    );
    assert!(!err.contains("root:x") && !err.contains("secret"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let err = fails(&env, &["image", "import", "/nonexistent"]);
    assert!(
        err.contains("no such file or directory: /nonexistent"),
        "{err}"
    );
    assert!(!err.contains("entity not found"), "{err}");
}

#[test]
fn pull_from_an_unreachable_registry_fails_at_once_without_colour_codes() {
    let env = Env::new();
    let port = support::free_port();
    let reference = format!("127.0.0.1:{port}/missing:1");

    let started = std::time::Instant::now();
    let err = fails(&env, &["pull", &reference]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "no retries: {:?}",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("registry 127.0.0.1:{port} is unreachable")),
        "{err}"
    );
    assert!(err.contains("connection refused"), "{err}");
    assert!(!err.contains("WARN") && !err.contains("retrying"), "{err}");

    let started = std::time::Instant::now();
    let err = fails(&env, &["run", "boxlite-no-such-host.invalid/x:1", "true"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(
        err.contains("registry boxlite-no-such-host.invalid is unreachable"),
        "{err}"
    );
    assert!(err.contains("does not resolve"), "{err}");

    // Diagnostics written to a file carry no terminal colour codes.
    let err = fails(&env, &["--log-level", "debug", "pull", &reference]);
    assert!(err.contains("DEBUG"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
}

/// `boxlite images | head -1` with the reader gone before the listing is written: the command
/// ends quietly with SIGPIPE's status, as a shell tool would, rather than panicking.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let env = Env::new();
    env.busybox();
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let out = env
        .cmd()
        .args(["images"])
        .stdout(std::process::Stdio::from(write_end))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
