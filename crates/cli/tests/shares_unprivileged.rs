//! Host shares when boxlite runs as an ordinary host user (not root), through the real CLI, a
//! real guest and virtiofsd: the guest's root stands for that user, as in rootless podman.
//! Files the user owns look like root's in the guest, what guest root creates (or chowns to
//! root) belongs to the user on the host, files of other host users look like `nobody`'s, and
//! the host still refuses writes the user could not make.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use support::Env;

/// A host user and group with no passwd entry: nothing on the machine runs as them.
const UID: u32 = 47_011;
const GID: u32 = 47_012;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of the boxlite programs with their guest assets beside them, in a folder anyone can read:
/// the checkout (and so target/) may sit where the test user cannot enter.
fn readable_install() -> tempfile::TempDir {
    let built = Path::new(env!("CARGO_BIN_EXE_boxlite"));
    let assets = built
        .ancestors()
        .skip(1)
        .take(4)
        .map(|d| d.join("assets"))
        .find(|d| d.join("vmlinux").is_file())
        .expect("guest assets (scripts/build-assets.sh) near the boxlite binary");
    let dir = tempfile::Builder::new()
        .prefix("blinstall")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    std::fs::create_dir(dir.path().join("assets")).unwrap();
    for program in ["boxlite", "boxlite-shim"] {
        let to = dir.path().join("bin").join(program);
        std::fs::copy(built.with_file_name(program), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for name in ["vmlinux", "initramfs.img"] {
        std::fs::copy(assets.join(name), dir.path().join("assets").join(name)).unwrap();
    }
    let open = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for d in ["", "bin", "assets"] {
        open(&dir.path().join(d), 0o755);
    }
    open(&dir.path().join("assets/vmlinux"), 0o644);
    open(&dir.path().join("assets/initramfs.img"), 0o644);
    dir
}

/// `boxlite ARGS` run as UID:GID with no supplementary groups, from `install`.
fn as_user(env: &Env, install: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={GID}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(install.join("bin/boxlite"))
        .args(args)
        .env_remove("BOXLITE_ASSETS")
        .env_remove("BOXLITE_SHIM")
        .env("BOXLITE_HOME", env.home.path())
        .env("HOME", env.home.path())
        .env("BOXLITE_ACCEL", "tcg")
        .env_remove("BOXLITE_LOG");
    cmd.output().expect("setpriv runs boxlite")
}

fn as_user_ok(env: &Env, install: &Path, args: &[&str]) -> String {
    let out = as_user(env, install, args);
    assert!(
        out.status.success(),
        "boxlite {args:?} as {UID} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// The value printed after `KEY=` on a line of `out`.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in guest output:\n{out}"))
        .trim()
}

#[test]
fn an_unprivileged_user_s_files_are_root_s_in_the_guest_and_guest_files_are_the_user_s() {
    let env = Env::new();
    let install = readable_install();
    // The home and the shared folder belong to the user; the image is imported by the user too.
    chown(env.home.path(), UID, GID);
    let share = tempfile::Builder::new()
        .prefix("blshare")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = share.path();
    chown(dir, UID, GID);
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("mine.txt"), "mine\n").unwrap();
    chown(&dir.join("mine.txt"), UID, GID);
    std::fs::write(dir.join("roots.txt"), "root's\n").unwrap();
    std::fs::set_permissions(
        dir.join("roots.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // The user's own copy of the test image (the shared one is readable by root only).
    let layout = share.path().with_extension("image");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(support::busybox_layout())
        .arg(&layout)
        .status()
        .unwrap();
    assert!(copied.success());
    let owned = Command::new("chown")
        .arg("-R")
        .arg(format!("{UID}:{GID}"))
        .arg(&layout)
        .status()
        .unwrap();
    assert!(owned.success());
    as_user_ok(
        &env,
        install.path(),
        &[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--tag",
            "localhost/busybox:test",
        ],
    );
    std::fs::remove_dir_all(&layout).unwrap();

    let mount = format!("{}:/s", dir.display());
    let script = "echo mine=$(stat -c %u:%g /s/mine.txt); \
                  echo roots=$(stat -c %u:%g /s/roots.txt); \
                  echo made > /s/made.txt && mkdir /s/made.d && echo created=yes; \
                  echo made=$(stat -c %u:%g /s/made.txt); \
                  chown 0:0 /s/made.txt && echo chown_root=ok; \
                  chown 1000:1000 /s/made.txt 2>/dev/null && echo chown_other=ok || echo chown_other=refused; \
                  (echo overwrite > /s/roots.txt) 2>/dev/null && echo write_roots=ok || echo write_roots=refused; \
                  cat /s/roots.txt";
    let out = as_user_ok(
        &env,
        install.path(),
        &[
            "run",
            "--rm",
            "-v",
            &mount,
            "localhost/busybox:test",
            "sh",
            "-c",
            script,
        ],
    );

    assert_eq!(
        field(&out, "mine"),
        "0:0",
        "the user's file is root's in the guest"
    );
    assert_eq!(
        field(&out, "roots"),
        "65534:65534",
        "another host user's file is nobody's in the guest, never root's"
    );
    assert_eq!(field(&out, "created"), "yes");
    assert_eq!(
        field(&out, "made"),
        "0:0",
        "guest root's new file is root's in the guest"
    );
    assert_eq!(field(&out, "chown_root"), "ok");
    assert_eq!(
        field(&out, "chown_other"),
        "refused",
        "the host user cannot give a file to an id it does not own"
    );
    assert_eq!(
        field(&out, "write_roots"),
        "refused",
        "the host refuses writes the user could not make, whatever guest root may do"
    );
    assert!(out.contains("root's\n"), "{out}");

    // On the host, everything the guest made belongs to the user, and root's file is untouched.
    assert_eq!(owner(&dir.join("made.txt")), (UID, GID));
    assert_eq!(owner(&dir.join("made.d")), (UID, GID));
    assert_eq!(
        std::fs::read_to_string(dir.join("made.txt")).unwrap(),
        "made\n"
    );
    assert_eq!(owner(&dir.join("roots.txt")), (0, 0));
    assert_eq!(
        std::fs::read_to_string(dir.join("roots.txt")).unwrap(),
        "root's\n"
    );
}
