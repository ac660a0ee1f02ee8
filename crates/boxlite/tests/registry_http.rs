//! HTTP behaviour of pulls against scripted servers: redirects to blob storage on another host
//! (credentials stay behind), retries of transient failures, mirrors tried before the registry.

#[path = "support/scripted.rs"]
mod scripted;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use boxlite::home::Home;
use boxlite::images::manager::ImageManager;
use boxlite::images::pull::PullOptions;
use boxlite::images::registry::{Credential, ImageSettings};
use scripted::{digest_of, Logged, Reply, Scripted};

fn quiet() -> PullOptions {
    PullOptions {
        quiet: true,
        ..PullOptions::default()
    }
}

/// Serves `repo`'s tag `1` from (manifest, config, layer).
fn serve_image(repo: &str, image: &(Vec<u8>, Vec<u8>, Vec<u8>), req: &Logged) -> Option<Reply> {
    let (manifest, config, layer) = image;
    let blobs: HashMap<String, &Vec<u8>> = [(digest_of(config), config), (digest_of(layer), layer)]
        .into_iter()
        .collect();
    if req.path() == format!("/v2/{repo}/manifests/1") {
        return Some(
            Reply::new(200, manifest.clone())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        );
    }
    let digest = req.path().strip_prefix(&format!("/v2/{repo}/blobs/"))?;
    blobs.get(digest).map(|b| Reply::new(200, (*b).clone()))
}

#[test]
fn blob_redirects_to_another_host_carry_no_credentials() {
    let image = scripted::tiny_image("redirected\n");
    let storage = {
        let image = image.clone();
        Scripted::start(move |req: &Logged| {
            let digest = req.path().trim_start_matches("/storage/");
            [&image.1, &image.2]
                .into_iter()
                .find(|b| digest_of(b) == digest)
                .map(|b| Reply::new(200, b.clone()))
                .unwrap_or_else(|| Reply::new(404, ""))
        })
    };
    let storage_host = storage.host();
    let registry = {
        let image = image.clone();
        Scripted::start(move |req: &Logged| {
            if req.header("Authorization") != Some("Basic dGVzdGVyOnMzY3JldC1wYXNz") {
                return Reply::new(401, "").header("WWW-Authenticate", "Basic realm=\"r\"");
            }
            if let Some(d) = req.path().strip_prefix("/v2/app/blobs/") {
                // Blob storage elsewhere, with a presigned-looking query.
                return Reply::new(307, "").header(
                    "Location",
                    &format!("http://{storage_host}/storage/{d}?X-Signature=abc"),
                );
            }
            serve_image("app", &image, req).unwrap_or_else(|| Reply::new(404, ""))
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let images = ImageManager::new(&Home::open(dir.path()).unwrap()).unwrap();
    images
        .credentials()
        .save(&registry.host(), &Credential::new("tester", "s3cret-pass"))
        .unwrap();
    let record = images
        .pull(&format!("{}/app:1", registry.host()), &quiet())
        .unwrap();
    assert_eq!(record.layers.len(), 1);
    let storage_log = storage.log();
    assert_eq!(
        storage_log.len(),
        2,
        "config and layer from storage: {storage_log:?}"
    );
    for r in &storage_log {
        assert_eq!(
            r.header("Authorization"),
            None,
            "credentials leaked to {}",
            r.url
        );
    }
}

#[test]
fn transient_failures_are_retried() {
    let image = scripted::tiny_image("flaky\n");
    let layer_digest = digest_of(&image.2);
    let failures = Arc::new(AtomicUsize::new(0));
    let manifest_failures = Arc::new(AtomicUsize::new(0));
    let server = {
        let (image, failures) = (image.clone(), failures.clone());
        let manifest_failures = manifest_failures.clone();
        Scripted::start(move |req: &Logged| {
            if req.path().contains("/manifests/")
                && manifest_failures.fetch_add(1, Ordering::SeqCst) < 1
            {
                return Reply::new(502, "bad gateway");
            }
            if req.path().ends_with(&layer_digest) && failures.fetch_add(1, Ordering::SeqCst) < 2 {
                return Reply::new(503, "busy");
            }
            serve_image("flaky", &image, req).unwrap_or_else(|| Reply::new(404, ""))
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let images = ImageManager::new(&Home::open(dir.path()).unwrap()).unwrap();
    images
        .pull(&format!("{}/flaky:1", server.host()), &quiet())
        .unwrap();
    assert_eq!(failures.load(Ordering::SeqCst), 3, "two 503s, then success");
    assert_eq!(
        manifest_failures.load(Ordering::SeqCst),
        2,
        "one 502, then success"
    );

    // A permanent error is not retried.
    let server = Scripted::start(|req: &Logged| {
        if req.path().contains("/manifests/") {
            let (m, _, _) = scripted::tiny_image("x");
            return Reply::new(200, m)
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
        }
        Reply::new(403, r#"{"errors":[{"code":"DENIED","message":"no"}]}"#)
    });
    let err = images
        .pull(&format!("{}/denied:1", server.host()), &quiet())
        .unwrap_err();
    assert!(format!("{err:?}").contains("403"), "{err:?}");
    let blob_requests = server
        .log()
        .iter()
        .filter(|r| r.path().contains("/blobs/"))
        .count();
    assert_eq!(blob_requests, 1);
}

#[test]
fn mirrors_are_tried_first() {
    let image = scripted::tiny_image("mirrored\n");
    let mirror = {
        let image = image.clone();
        Scripted::start(move |req: &Logged| {
            serve_image("team/app", &image, req).unwrap_or_else(|| Reply::new(404, ""))
        })
    };
    let dead_mirror = Scripted::start(|_req: &Logged| Reply::new(500, "down"));
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path()).unwrap();
    std::fs::write(
        home.config_path(),
        serde_json::to_vec(&serde_json::json!({
            "registry_mirrors": {
                "registry.invalid": [
                    format!("http://{}", dead_mirror.host()),
                    format!("http://{}", mirror.host()),
                ]
            }
        }))
        .unwrap(),
    )
    .unwrap();
    let settings = ImageSettings::load(&home).unwrap();
    assert_eq!(settings.mirrors["registry.invalid"].len(), 2);
    let images = ImageManager::new(&home).unwrap();
    let (record, report) = images
        .pull_with_report("registry.invalid/team/app:1", &quiet())
        .unwrap();
    assert_eq!(
        record.references,
        vec!["registry.invalid/team/app:1".to_string()]
    );
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains(&dead_mirror.host())),
        "{:?}",
        report.warnings
    );
    assert_eq!(
        mirror.log().len(),
        3,
        "manifest, config, layer from the mirror"
    );
}

/// Identity tokens (Docker's `"<token>"` user, `identitytoken` in config.json) are exchanged by
/// the OAuth2 refresh-token grant, never sent as a password.
#[test]
fn identity_tokens_use_the_refresh_token_grant() {
    let image = scripted::tiny_image("oauth\n");
    let port = Arc::new(std::sync::OnceLock::<u16>::new());
    let server = {
        let (image, port) = (image.clone(), port.clone());
        Scripted::start(move |req: &Logged| {
            if req.path() == "/token" {
                let form = String::from_utf8_lossy(&req.body).into_owned();
                let ok = req.method == "POST"
                    && form.contains("grant_type=refresh_token")
                    && form.contains("refresh_token=REFRESH-1")
                    && form.contains("scope=repository%3Aoauth%2Fapp%3Apull");
                return if ok {
                    Reply::new(200, r#"{"access_token":"ACCESS-1","expires_in":300}"#)
                } else {
                    Reply::new(
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad grant"}]}"#,
                    )
                };
            }
            if req.header("Authorization") != Some("Bearer ACCESS-1") {
                let realm = format!("http://127.0.0.1:{}/token", port.get().unwrap());
                return Reply::new(401, "").header(
                    "WWW-Authenticate",
                    &format!(r#"Bearer realm="{realm}",service="oauth-test""#),
                );
            }
            serve_image("oauth/app", &image, req).unwrap_or_else(|| Reply::new(404, ""))
        })
    };
    port.set(server.port()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = ImageManager::new(&Home::open(dir.path()).unwrap()).unwrap();
    images
        .credentials()
        .save(&server.host(), &Credential::identity_token("REFRESH-1"))
        .unwrap();
    images
        .pull(&format!("{}/oauth/app:1", server.host()), &quiet())
        .unwrap();
    let log = server.log();
    let grants: Vec<_> = log.iter().filter(|r| r.path() == "/token").collect();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].method, "POST");
    assert!(
        grants[0].header("Authorization").is_none(),
        "the token is in the form only"
    );
}
