//! `ImageManager::import` of images written by real tools: an OCI layout directory (umoci), an
//! oci-archive tar and a `docker save` tar (both by skopeo). Each import must give the image the
//! layout has (same config digest, same diff_ids) and unpack to what `umoci unpack` gives.

#[path = "support/testimages.rs"]
mod testimages;
#[path = "support/treecmp.rs"]
mod treecmp;

use std::path::Path;
use std::process::Command;

use boxlite::home::Home;
use boxlite::images::manager::ImageManager;

fn umoci_tree(layout: &Path, tag: &str, work: &Path) -> Vec<treecmp::Entry> {
    let bundle = work.join(format!("umoci-{tag}"));
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    treecmp::manifest(&bundle.join("rootfs"))
}

fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_same_tree(expected: &[treecmp::Entry], dir: &Path, what: &str) {
    let differences = treecmp::diff(
        expected,
        &treecmp::manifest(dir),
        &treecmp::Compare {
            mtimes: true,
            xattrs: true,
            ..Default::default()
        },
    );
    assert!(
        differences.is_empty(),
        "{what}:\n{}",
        differences.join("\n")
    );
}

#[test]
fn imports_layouts_oci_archives_and_docker_saves() {
    let imgs = testimages::build();
    let layout = imgs.layout();
    let work = tempfile::tempdir().unwrap();
    let home_dir = tempfile::tempdir().unwrap();
    let images = ImageManager::new(&Home::open(home_dir.path()).unwrap()).unwrap();
    let expected = umoci_tree(&layout, "app", work.path());
    let desc = testimages::descriptor(&layout, "app");
    let manifest = testimages::read_blob(&layout, desc["digest"].as_str().unwrap());
    let config = testimages::read_blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();

    // A layout with several images needs a name.
    let err = images.import(&layout, None).unwrap_err();
    assert!(err.to_string().contains("PATH:NAME"), "{err}");
    let err = images
        .import(Path::new(&format!("{}:nope", layout.display())), None)
        .unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");

    // OCI layout directory.
    let from_dir = images
        .import(
            Path::new(&format!("{}:app", layout.display())),
            Some("local/app:dir"),
        )
        .unwrap();
    assert_eq!(
        from_dir.id.to_string(),
        manifest["config"]["digest"].as_str().unwrap()
    );
    assert_eq!(
        from_dir.manifest_digest.to_string(),
        desc["digest"].as_str().unwrap()
    );
    assert_eq!(
        from_dir.references,
        vec!["docker.io/local/app:dir".to_string()]
    );
    let dest = work.path().join("dir");
    images.unpack("local/app:dir", &dest).unwrap();
    assert_same_tree(&expected, &dest, "import of an OCI layout");

    // oci-archive tar.
    let archive = work.path().join("app-oci.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &imgs.source("app"),
        &format!("oci-archive:{}:app", archive.display()),
    ]);
    let from_archive = images.import(&archive, Some("local/app:archive")).unwrap();
    assert_eq!(from_archive.id, from_dir.id);
    let dest = work.path().join("archive");
    images.unpack("local/app:archive", &dest).unwrap();
    assert_same_tree(&expected, &dest, "import of an oci-archive");

    // docker save tar (Docker's manifest.json format), named by its RepoTags.
    let saved = work.path().join("app-docker.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &imgs.source("app"),
        &format!(
            "docker-archive:{}:example.com/team/app:saved",
            saved.display()
        ),
    ]);
    let from_save = images.import(&saved, None).unwrap();
    assert_eq!(from_save.id, from_dir.id, "same config bytes, same image");
    assert_eq!(
        from_save.references,
        vec![
            "docker.io/local/app:archive".to_string(),
            "docker.io/local/app:dir".to_string(),
            "example.com/team/app:saved".to_string(),
        ]
    );
    assert_eq!(
        from_save
            .diff_ids
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        diff_ids
    );
    assert!(from_save
        .layers
        .iter()
        .all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar"));
    assert_eq!(from_save.config.cmd, from_dir.config.cmd);
    let dest = work.path().join("saved");
    images.unpack("example.com/team/app:saved", &dest).unwrap();
    assert_same_tree(&expected, &dest, "import of a docker save archive");

    // The same layers were extracted once for all three imports.
    assert_eq!(images.storage().extractions(), 2);

    // Junk is refused with the path named.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, vec![0u8; 2048]).unwrap();
    let err = images.import(&junk, None).unwrap_err();
    assert!(err.to_string().contains("junk.tar"), "{err}");
}
