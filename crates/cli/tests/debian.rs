//! A real distribution image end to end: Debian bookworm made by debootstrap and umoci, pushed to
//! a local `docker-registry` by skopeo, pulled by `boxlite pull`, run in a Box.

mod support;

use support::{debian_layout, Env, Registry};

#[test]
fn debian_from_a_registry_runs_with_working_apt_and_dpkg() {
    let registry = Registry::start();
    let reference = registry.push(&debian_layout(), "bookworm", "debian:bookworm");
    let env = Env::new();
    env.ok(&["pull", "--quiet", &reference]);

    let out = env.ok(&["run", "--rm", &reference, "cat", "/etc/debian_version"]);
    assert!(
        out.trim().starts_with("12."),
        "bookworm is Debian 12: {out:?}"
    );

    env.ok(&[
        "run", "-d", "--name", "deb", &reference, "sleep", "infinity",
    ]);
    let out = env.ok(&[
        "exec",
        "deb",
        "dpkg-query",
        "-W",
        "-f",
        "${Package} ${Status}\n",
        "dpkg",
        "apt",
    ]);
    assert!(
        out.contains("dpkg install ok installed") && out.contains("apt install ok installed"),
        "{out}"
    );
    let out = env.ok(&["exec", "deb", "apt-get", "--version"]);
    assert!(out.starts_with("apt "), "{out}");
    // dpkg writes its database: the Box's disk is writable and apt's tooling runs (no network
    // needed for this): install a tiny local package built in the Box.
    let script = "set -e; mkdir -p /tmp/p/DEBIAN; printf 'Package: boxlite-probe\\nVersion: 1\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: probe\\n' > /tmp/p/DEBIAN/control; dpkg-deb --build /tmp/p /tmp/p.deb >/dev/null; dpkg -i /tmp/p.deb >/dev/null; dpkg -s boxlite-probe | grep Status";
    let out = env.ok(&["exec", "deb", "sh", "-c", script]);
    assert_eq!(out, "Status: install ok installed\n");
    env.ok(&["rm", "-f", "deb"]);
}
