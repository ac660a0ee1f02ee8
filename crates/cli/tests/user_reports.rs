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
