//! The image commands of the CLI contract, run as a user would: `boxlite pull`, `images
//! --json`, `image unpack|rm|prune|import`, `login`/`logout`, against a real registry; two pulls
//! of one image at once; a pull killed midway and run again.

#[path = "../../boxlite/tests/support/registry.rs"]
mod registry;
#[path = "../../boxlite/tests/support/scripted.rs"]
mod scripted;
#[path = "../../boxlite/tests/support/testimages.rs"]
mod testimages;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry::{Auth, Registry};
use scripted::{digest_of, Logged, Reply, Scripted};

fn boxlite(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlite"));
    cmd.env("BOXLITE_HOME", home)
        .env("DOCKER_CONFIG", home.join("no-docker-config"))
        .env_remove("BOXLITE_INSECURE_REGISTRIES");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pull_list_unpack_remove_prune() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    reg.push(&imgs.source("base"), "cli/busybox:base", &[]);
    reg.push(&imgs.source("app"), "cli/busybox:app", &[]);
    let home = tempfile::tempdir().unwrap();
    let base = format!("{}/cli/busybox:base", reg.host());
    let app = format!("{}/cli/busybox:app", reg.host());

    let out = run(boxlite(home.path()).args(["pull", "--quiet", &base]));
    let id = stdout(&out).trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id:?}");
    assert!(
        out.stderr.is_empty(),
        "quiet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(boxlite(home.path()).args(["pull", &app]));

    let out = run(boxlite(home.path()).args(["images", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let base_record = list.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(base_record["references"][0], base.as_str());
    assert_eq!(base_record["config"]["Cmd"][0], "/bin/sh");
    assert_eq!(base_record["diff_ids"].as_array().unwrap().len(), 1);
    let table = stdout(&run(boxlite(home.path()).arg("images")));
    assert!(
        table.contains(&base) && table.contains(&id["sha256:".len()..][..12]),
        "{table}"
    );

    let dest = home.path().join("unpacked");
    run(boxlite(home.path())
        .args(["image", "unpack", &app])
        .arg(&dest));
    assert!(dest.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/app.conf")).unwrap(),
        "app=1\n"
    );

    let out = boxlite(home.path())
        .args(["image", "rm", "nothing/here:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing/here:1"));

    run(boxlite(home.path()).args(["image", "rm", &app]));
    run(boxlite(home.path()).args(["image", "rm", &base]));
    run(boxlite(home.path()).args(["image", "prune"]));
    let out = run(boxlite(home.path()).args(["images", "--json"]));
    assert_eq!(stdout(&out).trim(), "[]");
    let blobs = std::fs::read_dir(home.path().join("images/blobs/sha256"))
        .unwrap()
        .count();
    let layers = std::fs::read_dir(home.path().join("images/layers"))
        .unwrap()
        .count();
    assert_eq!((blobs, layers), (0, 0), "everything collected");
}

#[test]
fn login_logout_with_password_stdin() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::Basic {
        user: "tester".into(),
        password: "s3cret-pass".into(),
    });
    reg.push(&imgs.source("base"), "priv/busybox:1", &[]);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/priv/busybox:1", reg.host());

    let out = boxlite(home.path())
        .args(["pull", "-q", &reference])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authentication") && err.contains("boxlite login"),
        "{err}"
    );

    let login = |password: &str| {
        let mut child = boxlite(home.path())
            .args(["login", &reg.host(), "-u", "tester", "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        child.wait_with_output().unwrap()
    };
    let out = login("wrong-pass");
    assert!(!out.status.success());
    assert!(
        !home.path().join("auth.json").exists(),
        "refused credentials are not stored"
    );
    let out = login("s3cret-pass");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("Login Succeeded"));
    let auth = home.path().join("auth.json");
    assert_eq!(
        std::fs::metadata(&auth).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!std::fs::read_to_string(&auth)
        .unwrap()
        .contains("s3cret-pass"));

    // Debug logs of a pull never show the secret.
    let out = run(boxlite(home.path()).args(["--log-level", "trace", "pull", "-q", &reference]));
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(!logs.contains("s3cret-pass") && !logs.contains("dGVzdGVyOnMzY3JldC1wYXNz"));

    run(boxlite(home.path()).args(["logout", &reg.host()]));
    let out = boxlite(home.path())
        .args(["pull", "-q", &reference])
        .output()
        .unwrap();
    assert!(!out.status.success(), "logged out");
}

#[test]
fn two_processes_pulling_at_once_fetch_each_blob_once() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    reg.push(&imgs.source("del"), "race/busybox:1", &[]);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/race/busybox:1", reg.host());
    let children: Vec<_> = (0..2)
        .map(|_| {
            boxlite(home.path())
                .args(["pull", "-q", &reference])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ids: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout(&out).trim().to_string()
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    let out = run(boxlite(home.path()).args(["images", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record = &list[0];
    assert_eq!(list.as_array().unwrap().len(), 1);
    for layer in record["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(reg.blob_gets(digest), 1, "{digest}: {}", reg.access_log());
    }
}

/// A gzip layer holding one file of `size` incompressible bytes; returns (layer, diff_id).
fn random_layer(size: usize, seed: u64) -> (Vec<u8>, String) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    tar.append_data(&mut header, format!("data-{seed}.bin"), &data[..])
        .unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), digest_of(&raw))
}

/// A body that sends `head` bytes, then waits until `release` is set before the rest.
struct Stalling {
    data: Vec<u8>,
    pos: usize,
    head: usize,
    release: Arc<AtomicBool>,
}

impl std::io::Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.head {
            while !self.release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let end = if self.pos < self.head {
            self.head
        } else {
            self.data.len()
        };
        let n = buf.len().min(end - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn killed_pull_resumes_without_refetching() {
    let (small, small_diff) = random_layer(64 << 10, 7);
    let (big, big_diff) = random_layer(6 << 20, 11);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [small_diff, big_diff]},
    }))
    .unwrap();
    let layer = |b: &[u8]| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": digest_of(b), "size": b.len()})
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(&config), "size": config.len()},
        "layers": [layer(&small), layer(&big)],
    }))
    .unwrap();
    let (big_digest, small_digest, config_digest) =
        (digest_of(&big), digest_of(&small), digest_of(&config));
    let release = Arc::new(AtomicBool::new(false));
    let head = 2 << 20;

    let server = {
        let release = release.clone();
        let (big, big_digest) = (big.clone(), big_digest.clone());
        let blobs: Vec<(String, Vec<u8>)> = vec![
            (digest_of(&small), small.clone()),
            (digest_of(&config), config.clone()),
        ];
        Scripted::start(move |req: &Logged| {
            if req.path() == "/v2/slow/app/manifests/1" {
                return Reply::new(200, manifest.clone())
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
            }
            if req.path() == format!("/v2/slow/app/blobs/{big_digest}") {
                let start: usize = req
                    .header("Range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                let body = Stalling {
                    data: big[start..].to_vec(),
                    pos: 0,
                    head: head.min(big.len() - start),
                    release: release.clone(),
                };
                let len = big.len() - start;
                let reply =
                    Reply::stream(if start > 0 { 206 } else { 200 }, Box::new(body), Some(len));
                return if start > 0 {
                    reply.header(
                        "Content-Range",
                        &format!("bytes {start}-{}/{}", big.len() - 1, big.len()),
                    )
                } else {
                    reply
                };
            }
            for (d, b) in &blobs {
                if req.path() == format!("/v2/slow/app/blobs/{d}") {
                    return Reply::new(200, b.clone());
                }
            }
            Reply::new(404, "")
        })
    };

    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/slow/app:1", server.host());
    let mut child = boxlite(home.path())
        .args(["pull", "-q", &reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = home.path().join("tmp").join(format!(
        "blob-{}.partial",
        big_digest.strip_prefix("sha256:").unwrap()
    ));
    let small_blob = home
        .path()
        .join("images/blobs/sha256")
        .join(small_digest.strip_prefix("sha256:").unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        // Some of the head may sit in the server's buffers while it stalls.
        if got >= (head / 2) as u64 && small_blob.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pull never got halfway ({got} bytes)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    release.store(true, Ordering::Relaxed);
    let partial_len = std::fs::metadata(&partial).unwrap().len();
    assert!(partial_len >= (head / 2) as u64 && partial_len <= head as u64);

    let out = run(boxlite(home.path()).args(["pull", "-q", &reference]));
    assert!(stdout(&out).trim().starts_with("sha256:"));
    assert!(!partial.exists());

    let log = server.log();
    let gets = |d: &str| {
        log.iter()
            .filter(|r| r.path().ends_with(&format!("/blobs/{d}")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        gets(&small_digest).len(),
        1,
        "finished blobs are never fetched again"
    );
    assert_eq!(gets(&config_digest).len(), 1);
    let big_gets = gets(&big_digest);
    assert_eq!(big_gets.len(), 2);
    assert_eq!(big_gets[0].header("Range"), None);
    assert_eq!(
        big_gets[1].header("Range"),
        Some(format!("bytes={partial_len}-").as_str()),
        "the rerun continues where the killed pull stopped"
    );
    let unpacked = home.path().join("rootfs");
    run(boxlite(home.path())
        .args(["image", "unpack", &reference])
        .arg(&unpacked));
    assert_eq!(
        std::fs::metadata(unpacked.join("data-11.bin"))
            .unwrap()
            .len(),
        6 << 20
    );
}

#[test]
fn insecure_registry_flag_allows_plain_http() {
    // The machine's host name must resolve to loopback (it does on Debian's default
    // /etc/hosts); it is not a loopback *name*, so plain HTTP needs the flag.
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let host = host.trim().to_string();
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 80))
        .map(|mut a| a.any(|a| a.ip().to_string() == "127.0.0.1"))
        .unwrap_or(false);
    assert!(
        resolved,
        "host name {host} must resolve to 127.0.0.1 for this test"
    );
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    reg.push(&imgs.source("base"), "ins/busybox:1", &[]);
    let port = reg.host().rsplit(':').next().unwrap().to_string();
    let reference = format!("{host}:{port}/ins/busybox:1");
    let home = tempfile::tempdir().unwrap();

    let out = boxlite(home.path())
        .args(["pull", "-q", &reference])
        .output()
        .unwrap();
    assert!(!out.status.success(), "HTTPS is required by default");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("https://{host}:{port}")));
    run(boxlite(home.path()).args([
        "pull",
        "-q",
        "--insecure-registry",
        &format!("{host}:{port}"),
        &reference,
    ]));
    run(boxlite(home.path())
        .env(
            "BOXLITE_INSECURE_REGISTRIES",
            format!("other:1,{host}:{port}"),
        )
        .args(["pull", "-q", &reference]));
}

#[test]
fn import_docker_save_and_unpack() {
    let imgs = testimages::build();
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved.tar");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", &imgs.source("del")])
        .arg(format!(
            "docker-archive:{}:saved/busybox:del",
            saved.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home = tempfile::tempdir().unwrap();
    let out = run(boxlite(home.path()).args(["image", "import"]).arg(&saved));
    assert!(stdout(&out).trim().starts_with("sha256:"));
    let dest = work.path().join("rootfs");
    run(boxlite(home.path())
        .args(["image", "unpack", "saved/busybox:del"])
        .arg(&dest));
    assert!(dest.join("etc/app.conf").exists() && !dest.join("etc/issue").exists());
    let out = run(boxlite(home.path())
        .args(["image", "import", "--tag", "mine/layout:1"])
        .arg(format!("{}:base", imgs.layout().display())));
    let id = stdout(&out).trim().to_string();
    let list = stdout(&run(boxlite(home.path()).args(["images", "--json"])));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str() && r["references"][0] == "docker.io/mine/layout:1"));
}

#[test]
fn docker_config_auths_and_credential_helpers() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::Basic {
        user: "tester".into(),
        password: "s3cret-pass".into(),
    });
    reg.push(&imgs.source("base"), "dc/busybox:1", &[]);
    let reference = format!("{}/dc/busybox:1", reg.host());
    let work = tempfile::tempdir().unwrap();

    // `auths` with base64 user:password.
    let docker = work.path().join("docker-auths");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"dGVzdGVyOnMzY3JldC1wYXNz"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    run(boxlite(home.path())
        .env("DOCKER_CONFIG", &docker)
        .args(["pull", "-q", &reference]));

    // `credHelpers` naming a docker-credential-* program on PATH.
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-boxtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" > {}\n\
             echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"tester\",\"Secret\":\"s3cret-pass\"}}'\n",
            work.path().join("asked").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker = work.path().join("docker-helpers");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"boxtest"}}}}"#, reg.host()),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home = tempfile::tempdir().unwrap();
    run(boxlite(home.path())
        .env("DOCKER_CONFIG", &docker)
        .env("PATH", &path)
        .args(["pull", "-q", &reference]));
    let asked = std::fs::read_to_string(work.path().join("asked")).unwrap();
    assert_eq!(asked.trim(), reg.host());

    // A helper that fails is reported by name.
    std::fs::write(&helper, "#!/bin/sh\necho 'helper broke' >&2\nexit 3\n").unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = boxlite(home.path())
        .env("DOCKER_CONFIG", &docker)
        .env("PATH", &path)
        .args(["pull", "-q", &reference])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("docker-credential-boxtest") && err.contains("helper broke"),
        "{err}"
    );
}

/// Case 15 through the CLI: the layer limit comes from the home's config file, the bomb is
/// refused naming the layer and the limit, and the pull never holds the layer in memory.
#[test]
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reports its peak memory
fn bomb_is_refused_with_bounded_memory() {
    let case = registry::run_case("15-", &["512"]);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.path().join("expected.json")).unwrap()).unwrap();
    let reg = Registry::start(Auth::None);
    reg.push(
        &format!("oci:{}:latest", case.path().join("bomb").display()),
        "case15/bomb:1",
        &[],
    );
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.json"),
        r#"{"limits": {"max_layer_size": 67108864}}"#,
    )
    .unwrap();
    let child = boxlite(home.path())
        .args(["pull", "-q", &format!("{}/case15/bomb:1", reg.host())])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 125,
        "status {status}"
    );
    let stderr = std::fs::read_to_string(home.path().join("stderr")).unwrap();
    assert!(
        stderr.contains(expected["bomb"]["layer_digest"].as_str().unwrap()),
        "{stderr}"
    );
    assert!(stderr.contains("67108864"), "the limit is named: {stderr}");
    let peak_mib = usage.ru_maxrss / 1024;
    assert!(
        peak_mib < 128,
        "peak RSS {peak_mib} MiB for a 512 MiB layer: not streaming"
    );
    assert_eq!(
        std::fs::read_dir(home.path().join("images/layers"))
            .unwrap()
            .count(),
        0
    );
}
