//! The layer cases from `shared/cases` (03, 05, 08, 11, 14): each generator runs at test time,
//! its layers go through `ImageStorage::ensure_layer` and `assemble`, and every expected value
//! from the case is checked, in both assembly modes where the mode matters.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use boxlite::images::assemble::AssembleMode;
use serde_json::Value;
use support::{all_names, run_case, Cache};

const MODES: [AssembleMode; 2] = [AssembleMode::Link, AssembleMode::Copy];

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn ino(p: &Path) -> (u64, u64) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.dev(), md.ino())
}

fn tars(dir: &Path, names: &Value) -> Vec<PathBuf> {
    names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| dir.join(n.as_str().unwrap()))
        .collect()
}

#[test]
fn case03_opaque_whiteout_anywhere_in_the_tar() {
    let gen = tempfile::tempdir().unwrap();
    let expected = run_case("03", gen.path(), &[]);
    for mode in MODES {
        for stack in expected["stacks"].as_array().unwrap() {
            let cache = Cache::new();
            let (root, result) = cache.stack(&tars(gen.path(), stack), mode);
            result.unwrap_or_else(|e| panic!("{stack}: {e:#}"));
            for (path, content) in expected["present"].as_object().unwrap() {
                assert_eq!(
                    fs::read_to_string(root.join(path)).unwrap(),
                    content.as_str().unwrap(),
                    "{stack} {mode:?}: {path}"
                );
            }
            for path in expected["absent"].as_array().unwrap() {
                let p = root.join(path.as_str().unwrap());
                assert!(
                    fs::symlink_metadata(&p).is_err(),
                    "{stack} {mode:?}: {} must be absent",
                    p.display()
                );
            }
            let prefix = expected["no_path_component_starting_with"]
                .as_str()
                .unwrap();
            for name in all_names(&root) {
                assert!(
                    !name.split('/').any(|c| c.starts_with(prefix)),
                    "{stack} {mode:?}: {name} starts with {prefix}"
                );
            }
            // The cached layer 2 keeps the marker in its side table, not as a file.
            let layer2 = cache
                .add_tar(&gen.path().join(stack[1].as_str().unwrap()))
                .unwrap();
            assert!(
                !layer2.extracted,
                "already in the cache: no second extraction"
            );
            for name in all_names(&cache.storage.layer_root(&layer2.diff_id)) {
                assert!(
                    !name.split('/').any(|c| c.starts_with(".wh.")),
                    "cache holds {name}"
                );
            }
            let meta = cache.storage.read_meta(&layer2.diff_id).unwrap();
            assert_eq!(
                meta.opaque_dirs
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>(),
                ["a"]
            );
            assert_eq!(cache.storage.extractions(), 3);
        }
    }
}

#[test]
fn case05_hardlinks_survive_whiteout_and_replacement() {
    let gen = tempfile::tempdir().unwrap();
    let expected = run_case("05", gen.path(), &[]);
    let scenarios = expected["scenarios"].as_object().unwrap();
    for mode in MODES {
        for (label, sc) in scenarios {
            let cache = Cache::new();
            let (root, result) = cache.stack(&tars(gen.path(), &sc["stack"]), mode);
            result.unwrap_or_else(|e| panic!("scenario {label} {mode:?}: {e:#}"));
            for (path, want) in sc["present"].as_object().unwrap() {
                let p = root.join(path);
                assert_eq!(
                    fs::read_to_string(&p).unwrap(),
                    want["content"].as_str().unwrap(),
                    "scenario {label} {mode:?}: {path}"
                );
                if let Some(m) = want.get("mode") {
                    let m = u32::from_str_radix(m.as_str().unwrap(), 8).unwrap();
                    assert_eq!(mode_of(&p), m, "scenario {label} {mode:?}: mode of {path}");
                }
                if let Some(size) = want.get("size") {
                    assert_eq!(fs::metadata(&p).unwrap().len(), size.as_u64().unwrap());
                }
            }
            for path in sc
                .get("absent")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert!(fs::symlink_metadata(root.join(path.as_str().unwrap())).is_err());
            }
            if label == "C" {
                // Linked against the assembled tree: tool-c shares tool-b's inode.
                assert_eq!(
                    ino(&root.join("usr/bin/tool-c")),
                    ino(&root.join("usr/bin/tool-b"))
                );
            }
            if label == "B" {
                assert_ne!(
                    ino(&root.join("usr/bin/tool-a")),
                    ino(&root.join("usr/bin/tool-b"))
                );
            }
            // The cache's L1 is untouched whatever the mode did.
            let l1 = cache.add_tar(&gen.path().join("L1.tar")).unwrap();
            if label != "D" {
                let cached = cache.storage.layer_root(&l1.diff_id).join("usr/bin/tool-a");
                assert_eq!(fs::read_to_string(&cached).unwrap(), "original tool\n");
                assert_eq!(mode_of(&cached), 0o755);
            }
        }
    }
}

#[test]
fn case08_xattrs_and_capability_from_pax() {
    let gen = tempfile::tempdir().unwrap();
    let expected = run_case("08", gen.path(), &[]);
    for mode in MODES {
        let cache = Cache::new();
        let (root, result) = cache.stack(&[gen.path().join("layer.tar")], mode);
        result.unwrap();
        for (path, attrs) in expected["xattrs_user_namespace_always"]
            .as_object()
            .unwrap()
        {
            for (name, value) in attrs.as_object().unwrap() {
                let got = xattr::get(root.join(path), name).unwrap();
                assert_eq!(
                    got.as_deref(),
                    Some(value.as_str().unwrap().as_bytes()),
                    "{path} {name}"
                );
            }
        }
        let file = "data/with-user-xattr";
        let mut names: Vec<String> = xattr::list(root.join(file))
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.starts_with("user."))
            .collect();
        names.sort();
        let want: Vec<&str> = expected["exact_user_xattr_set"][file]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names, want, "non-xattr pax records must not become xattrs");

        for (path, owner) in expected["owner_after_extraction"].as_object().unwrap() {
            let md = fs::metadata(root.join(path)).unwrap();
            assert_eq!(
                [md.uid(), md.gid()],
                [
                    owner[0].as_u64().unwrap() as u32,
                    owner[1].as_u64().unwrap() as u32
                ]
            );
        }
        let cap_hex = expected["xattrs_when_privileged"]["usr/bin/ping"]["security.capability_hex"]
            .as_str()
            .unwrap();
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test checks the privileged path: run as root"
        );
        let cap = xattr::get(root.join("usr/bin/ping"), "security.capability").unwrap();
        assert_eq!(
            cap.map(hex::encode).as_deref(),
            Some(cap_hex),
            "{mode:?}: capability after chown"
        );
        assert_eq!(mode_of(&root.join("usr/bin/ping")), 0o755);
        let meta = cache
            .storage
            .read_meta(
                &cache
                    .add_tar(&gen.path().join("layer.tar"))
                    .unwrap()
                    .diff_id,
            )
            .unwrap();
        assert!(meta.skipped_xattrs.is_empty(), "{:?}", meta.skipped_xattrs);
    }
}

#[test]
fn case11_absolute_hardlink_targets_resolve_inside_the_root() {
    let gen = tempfile::tempdir().unwrap();
    let sentinel_dir = tempfile::tempdir().unwrap();
    let sentinel = sentinel_dir.path().join("11");
    fs::create_dir_all(&sentinel).unwrap();
    let secret = sentinel.join("secret");
    fs::write(&secret, "host secret\n").unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let expected = run_case("11", gen.path(), &[sentinel.to_str().unwrap()]);

    for mode in MODES {
        let cache = Cache::new();
        let (root, result) = cache.stack(&[gen.path().join("layer-absolute-ok.tar")], mode);
        result.unwrap();
        for (link, target) in expected["layer-absolute-ok.tar"]["same_inode_as"]
            .as_object()
            .unwrap()
        {
            assert_eq!(
                ino(&root.join(link)),
                ino(&root.join(target.as_str().unwrap()))
            );
        }
        assert_eq!(
            ino(&root.join("usr/bin/perlthanks2")),
            ino(&root.join("usr/bin/perlbug"))
        );

        for (tar, spec) in expected["escapes"].as_object().unwrap() {
            let cache = Cache::new();
            let outcome = cache
                .add_tar(&gen.path().join(tar))
                .map_err(|e| format!("{e:#} {}", chain(&e)))
                .and_then(|info| {
                    let (root, r) = cache.assemble(&[info.diff_id], mode);
                    assert!(
                        !root.join("stolen").exists()
                            || fs::read_to_string(root.join("stolen")).unwrap() != "host secret\n"
                    );
                    r.map_err(|e| format!("{e:#} {}", chain(&e)))
                });
            let err = outcome.expect_err(&format!("{tar} must fail"));
            eprintln!("{tar} ({mode:?}): {err}");
            assert!(
                err.contains("stolen"),
                "{tar}: error must name 'stolen': {err}"
            );
            assert_eq!(spec["outcome"], "error naming 'stolen'");
            // Nothing outside was touched or linked.
            assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
            assert_eq!(fs::read_to_string(&secret).unwrap(), "host secret\n");
            // A refused layer leaves nothing in the cache or staging.
            assert_eq!(fs::read_dir(cache.home.tmp_dir()).unwrap().count(), 0);
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(&format!(": {c}"));
        cur = c.source();
    }
    out
}

#[test]
fn case14_long_names_gnu_pax_ustar() {
    let gen = tempfile::tempdir().unwrap();
    let expected = run_case("14", gen.path(), &[]);
    for tar in ["layer-gnu.tar", "layer-pax.tar", "layer-ustar.tar"] {
        for mode in MODES {
            let cache = Cache::new();
            let (root, result) = cache.stack(&[gen.path().join(tar)], mode);
            result.unwrap_or_else(|e| panic!("{tar}: {e:#}"));
            for (path, want) in expected[tar].as_object().unwrap() {
                let p = root.join(path);
                match want["type"].as_str().unwrap() {
                    "file" => {
                        if let Some(c) = want.get("content") {
                            assert_eq!(
                                fs::read_to_string(&p).unwrap(),
                                c.as_str().unwrap(),
                                "{tar}: {path}"
                            );
                        }
                        if let Some(t) = want.get("same_inode_as") {
                            assert_eq!(
                                ino(&p),
                                ino(&root.join(t.as_str().unwrap())),
                                "{tar}: {path}"
                            );
                        }
                    }
                    "symlink" => assert_eq!(
                        fs::read_link(&p).unwrap().to_str().unwrap(),
                        want["target"].as_str().unwrap(),
                        "{tar}: {path}"
                    ),
                    other => panic!("unexpected type {other}"),
                }
            }
            let bad: Vec<&str> = expected["absent_anywhere"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            for name in all_names(&root) {
                for b in &bad {
                    assert!(
                        !name
                            .split('/')
                            .any(|c| c.starts_with(b.trim_start_matches("././"))),
                        "{tar}: {name}"
                    );
                }
            }
        }
    }
}
