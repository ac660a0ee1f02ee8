//! Pulls from a real registry (Debian's docker-registry on 127.0.0.1) of images made by umoci
//! and pushed by skopeo: records, shared layers, Basic and token auth, zstd, Docker schema 2 and
//! multi-platform indexes.

#[path = "support/registry.rs"]
mod registry;
#[path = "support/testimages.rs"]
mod testimages;

use boxlite::images::manifest::Platform;
use boxlite::images::pull::PullOptions;
use boxlite::images::registry::Credential;
use registry::{chain, manager, quiet, Auth, Registry};

#[test]
fn pull_records_the_image_and_its_blobs() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    reg.push(&imgs.source("base"), "test/busybox:1", &[]);
    let (home, images) = manager();

    let reference = format!("{}/test/busybox:1", reg.host());
    let (record, report) = images.pull_with_report(&reference, &quiet()).unwrap();

    let desc = testimages::descriptor(&imgs.layout(), "base");
    let manifest = testimages::read_blob(&imgs.layout(), desc["digest"].as_str().unwrap());
    let config = testimages::read_blob(
        &imgs.layout(),
        manifest["config"]["digest"].as_str().unwrap(),
    );
    assert_eq!(
        record.id.to_string(),
        manifest["config"]["digest"].as_str().unwrap()
    );
    assert_eq!(
        record.manifest_digest.to_string(),
        desc["digest"].as_str().unwrap()
    );
    assert_eq!(record.references, vec![reference.clone()]);
    assert_eq!(
        record
            .diff_ids
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        record.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string()][..])
    );
    assert!(record
        .config
        .env
        .as_ref()
        .unwrap()
        .contains(&"GREETING=hello".to_string()));
    assert_eq!(record.config.working_dir.as_deref(), Some("/home/tester"));
    assert_eq!(record.config.user.as_deref(), Some("tester"));
    assert!(record
        .config
        .exposed_ports
        .as_ref()
        .unwrap()
        .contains_key("8080/tcp"));
    assert_eq!(
        record.config.labels.as_ref().unwrap()["org.boxlite.test"],
        "base"
    );
    assert_eq!(
        (record.os.as_str(), record.architecture.as_str()),
        ("linux", "amd64")
    );
    assert_eq!(record.size, manifest["layers"][0]["size"].as_u64().unwrap());
    assert_eq!(report.blobs_downloaded, 2, "{report:?}");

    // Every blob is in the store under its digest, and hashes to it.
    for digest in &record.blobs {
        let path = home.path().join("images/blobs/sha256").join(digest.hex());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(boxlite::images::digest::Digest::of(&bytes), *digest);
    }
    // Found by reference, by id prefix and by repo digest.
    assert_eq!(images.get(&reference).unwrap().id, record.id);
    assert_eq!(images.get(&record.id.hex()[..12]).unwrap().id, record.id);
    assert_eq!(
        images
            .get(record.repo_digest.as_deref().unwrap())
            .unwrap()
            .id,
        record.id
    );
    assert_eq!(images.list().unwrap().len(), 1);

    // A second pull of the same tag fetches no blob.
    let (_, again) = images.pull_with_report(&reference, &quiet()).unwrap();
    assert_eq!(again.blobs_downloaded, 0, "{again:?}");
    let layer = record.layers[0].digest.to_string();
    assert_eq!(reg.blob_gets(&layer), 1, "{}", reg.access_log());
}

#[test]
fn images_sharing_layers_fetch_only_new_ones() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::None);
    for tag in ["base", "app", "del"] {
        reg.push(&imgs.source(tag), &format!("test/busybox:{tag}"), &[]);
    }
    let (_home, images) = manager();
    let base = images
        .pull(&format!("{}/test/busybox:base", reg.host()), &quiet())
        .unwrap();
    let (app, report) = images
        .pull_with_report(&format!("{}/test/busybox:app", reg.host()), &quiet())
        .unwrap();
    assert_eq!(app.layers.len(), 2);
    assert_eq!(app.layers[0], base.layers[0]);
    assert_eq!(report.blobs_present, 1, "base layer reused: {report:?}");
    assert_eq!(
        report.blobs_downloaded, 2,
        "config and the new layer: {report:?}"
    );

    let (del, report) = images
        .pull_with_report(&format!("{}/test/busybox:del", reg.host()), &quiet())
        .unwrap();
    assert_eq!(del.layers.len(), 3);
    assert_eq!(report.blobs_present, 2, "{report:?}");
    assert_eq!((report.layers_extracted, report.layers_present), (1, 2));
    assert_eq!(
        report.layers_streamed, 1,
        "the new layer is extracted while it downloads: {report:?}"
    );
    assert_eq!(
        images.storage().extractions(),
        3,
        "one extraction per diff_id"
    );
    for layer in &del.layers {
        assert_eq!(
            reg.blob_gets(&layer.digest.to_string()),
            1,
            "{}",
            layer.digest
        );
    }

    // Removing `app` keeps what `base` and `del` still use.
    let freed = images
        .remove(&format!("{}/test/busybox:app", reg.host()), &[])
        .unwrap();
    assert_eq!(freed.images_removed, vec![app.id.clone()]);
    assert_eq!(
        freed.blobs_removed, 2,
        "app's manifest and config only: {freed:?}"
    );
    for layer in &del.layers {
        assert!(images.store().contains(&layer.digest));
    }
    // An image in use is not removed.
    let err = images
        .remove(
            &format!("{}/test/busybox:del", reg.host()),
            std::slice::from_ref(&del.id),
        )
        .unwrap_err();
    assert!(err.to_string().contains("used by a Box"), "{err}");
    images
        .remove(&format!("{}/test/busybox:del", reg.host()), &[])
        .unwrap();
    images
        .remove(&format!("{}/test/busybox:base", reg.host()), &[])
        .unwrap();
    assert!(images.list().unwrap().is_empty());
    assert!(
        images.store().list().unwrap().is_empty(),
        "every blob collected"
    );
}

#[test]
fn basic_auth_login_and_logout() {
    let imgs = testimages::build();
    let reg = Registry::start(Auth::Basic {
        user: "tester".into(),
        password: "s3cret-pass".into(),
    });
    reg.push(&imgs.source("base"), "private/busybox:1", &[]);
    let (_home, images) = manager();
    let reference = format!("{}/private/busybox:1", reg.host());

    let err = images.pull(&reference, &quiet()).unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains(&format!("authentication to {} failed", reg.host())),
        "{msg}"
    );
    assert!(msg.contains("boxlite login"), "{msg}");

    let err = images
        .login(&reg.host(), Credential::new("tester", "wrong"))
        .unwrap_err();
    assert!(chain(&err).contains("authentication"), "{}", chain(&err));
    assert!(!chain(&err).contains("wrong"), "no secret in errors");

    images
        .login(&reg.host(), Credential::new("tester", "s3cret-pass"))
        .unwrap();
    images.pull(&reference, &quiet()).unwrap();
    assert!(images.logout(&reg.host()).unwrap());
    assert!(!images.logout(&reg.host()).unwrap());
}

#[test]
fn token_auth_anonymous_and_with_credentials() {
    let imgs = testimages::build();

    // Anonymous pulls get a token; one token serves the whole pull.
    let open = Registry::start(Auth::Token {
        user: Some(("pusher".into(), "push-pass".into())),
        anonymous_pull: true,
    });
    open.push(&imgs.source("app"), "pub/busybox:app", &[]);
    let issuer = open.issuer.as_ref().unwrap();
    let before = issuer.count();
    let (_home, images) = manager();
    let (record, _) = images
        .pull_with_report(&format!("{}/pub/busybox:app", open.host()), &quiet())
        .unwrap();
    assert_eq!(record.layers.len(), 2);
    let requests: Vec<_> = issuer.requests.lock().unwrap()[before..].to_vec();
    assert_eq!(
        requests.len(),
        1,
        "one token per scope per pull: {requests:?}"
    );
    assert!(requests[0]
        .url
        .contains("scope=repository%3Apub%2Fbusybox%3Apull"));
    assert!(requests[0].authorization.is_none(), "anonymous");

    // A registry that wants credentials: refused without, accepted after login.
    let closed = Registry::start(Auth::Token {
        user: Some(("tester".into(), "s3cret-pass".into())),
        anonymous_pull: false,
    });
    closed.push(&imgs.source("base"), "priv/busybox:1", &[]);
    let reference = format!("{}/priv/busybox:1", closed.host());
    let err = images.pull(&reference, &quiet()).unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains("authentication failed (401)"), "{msg}");
    assert!(msg.contains("credentials required"), "{msg}");
    images
        .login(&closed.host(), Credential::new("tester", "s3cret-pass"))
        .unwrap();
    images.pull(&reference, &quiet()).unwrap();
    let last = closed
        .issuer
        .as_ref()
        .unwrap()
        .requests
        .lock()
        .unwrap()
        .last()
        .cloned();
    assert!(last.unwrap().authorization.unwrap().starts_with("Basic "));
}

#[test]
fn zstd_docker_schema2_and_multi_platform() {
    let imgs = testimages::build();
    let index_digest = testimages::add_multi_platform_index(&imgs.layout());
    let reg = Registry::start(Auth::None);
    reg.push(
        &imgs.source("app"),
        "fmt/zstd:1",
        &["--dest-compress-format", "zstd", "--dest-compress"],
    );
    reg.push(&imgs.source("app"), "fmt/v2s2:1", &["--format", "v2s2"]);
    reg.push(&imgs.source("multi"), "fmt/multi:1", &["--all"]);
    let (_home, images) = manager();

    let zstd = images
        .pull(&format!("{}/fmt/zstd:1", reg.host()), &quiet())
        .unwrap();
    assert!(
        zstd.layers.iter().all(|l| l.media_type.ends_with("+zstd")),
        "{:?}",
        zstd.layers
    );
    let v2s2 = images
        .pull(&format!("{}/fmt/v2s2:1", reg.host()), &quiet())
        .unwrap();
    assert!(v2s2
        .layers
        .iter()
        .all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"));
    assert_eq!(v2s2.diff_ids, zstd.diff_ids, "same content, same diff_ids");

    let amd = images
        .pull(&format!("{}/fmt/multi:1", reg.host()), &quiet())
        .unwrap();
    assert_eq!(amd.architecture, "amd64");
    assert_eq!(
        amd.repo_digest.as_deref(),
        Some(format!("{}/fmt/multi@{index_digest}", reg.host()).as_str())
    );
    let arm = images
        .pull(
            &format!("{}/fmt/multi:1", reg.host()),
            &PullOptions {
                platform: Platform::parse("linux/arm64"),
                quiet: true,
                ..PullOptions::default()
            },
        )
        .unwrap();
    assert_eq!(arm.architecture, "arm64");
    assert_ne!(arm.id, amd.id);
    let err = images
        .pull(
            &format!("{}/fmt/multi:1", reg.host()),
            &PullOptions {
                platform: Platform::parse("linux/s390x"),
                quiet: true,
                ..PullOptions::default()
            },
        )
        .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm64"),
        "{msg}"
    );

    // By digest: the index digest pins the same image.
    let pinned = images
        .pull(
            &format!("{}/fmt/multi@{index_digest}", reg.host()),
            &quiet(),
        )
        .unwrap();
    assert_eq!(pinned.id, amd.id);
}

#[test]
fn unreachable_and_missing() {
    let reg = Registry::start(Auth::None);
    let (_home, images) = manager();
    let err = images
        .pull(&format!("{}/nope/nothing:1", reg.host()), &quiet())
        .unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains("manifest nope/nothing:1 not found"), "{msg}");
    let port = registry::free_port();
    let err = images
        .pull(&format!("127.0.0.1:{port}/x:1"), &quiet())
        .unwrap_err();
    assert!(
        chain(&err).contains(&format!("127.0.0.1:{port}")),
        "{}",
        chain(&err)
    );
    let err = images.pull("Not A Reference", &quiet()).unwrap_err();
    assert!(err.to_string().contains("\"Not A Reference\""), "{err}");
}
