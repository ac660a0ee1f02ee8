//! Shared cases from the wild, as pulls: 17 (content not matching the requested digest), 19
//! (token response shapes), 21 (foreign-layer URLs must never see credentials) against scripted
//! servers, and the pull half of 15 (decompression bomb, wrong diff_id) against a real registry.

#[path = "support/registry.rs"]
mod registry;
#[path = "support/scripted.rs"]
mod scripted;

use std::collections::HashMap;
use std::path::Path;

use boxlite::home::Home;
use boxlite::images::digest::Digest;
use boxlite::images::manager::ImageManager;
use boxlite::images::registry::{Credential, ImageSettings};
use registry::{chain, manager, quiet};
use scripted::{digest_of, Logged, Reply, Scripted};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A server answering from one scenario of case 17's routes.json: first match wins.
fn routes_server(routes: &serde_json::Value, blobs: &Path) -> Scripted {
    let routes = routes.as_array().unwrap().clone();
    let blobs = blobs.to_path_buf();
    Scripted::start(move |req: &Logged| {
        for route in &routes {
            if req.method == "GET" && route["GET"].as_str() == Some(req.path()) {
                let body = route["body_blob"]
                    .as_str()
                    .map(|d| std::fs::read(blobs.join(d.strip_prefix("sha256:").unwrap())).unwrap())
                    .unwrap_or_default();
                let mut reply = Reply::new(route["status"].as_u64().unwrap() as u16, body);
                if let Some(headers) = route["headers"].as_object() {
                    for (k, v) in headers {
                        reply = reply.header(k, v.as_str().unwrap());
                    }
                }
                return reply;
            }
        }
        Reply::new(404, r#"{"errors":[{"code":"NOT_FOUND"}]}"#)
    })
}

#[test]
fn case17_content_must_match_the_requested_digest() {
    let case = registry::run_case("17-", &[]);
    let routes = json(&case.path().join("routes.json"));
    let blobs = case.path().join("blobs");

    // A: a manifest asked for by digest comes back as another manifest.
    let a = &routes["A_manifest_swap"];
    let swap = a
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["body_blob"].is_string())
        .unwrap();
    let good = swap["GET"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let evil = swap["body_blob"].as_str().unwrap().to_string();
    let server = routes_server(a, &blobs);
    let (home, images) = manager();
    let err = images
        .pull(&format!("{}/test/app@{good}", server.host()), &quiet())
        .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains("digest mismatch") && msg.contains(&good) && msg.contains(&evil),
        "{msg}"
    );
    for d in [&good, &evil] {
        assert!(!images.store().contains(&d.parse().unwrap()), "{d} stored");
    }
    assert!(
        server.log().iter().all(|r| !r.path().contains("/blobs/")),
        "no blob of the substituted manifest is fetched: {:?}",
        server.log()
    );
    assert_eq!(
        std::fs::read_dir(home.path().join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );

    // B: the layer blob is other bytes of the same length.
    let b = &routes["B_layer_swap"];
    let swap = b
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            let path = r["GET"].as_str().unwrap();
            path.contains("/blobs/") && !path.ends_with(r["body_blob"].as_str().unwrap())
        })
        .unwrap();
    let good_layer = swap["GET"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let served = swap["body_blob"].as_str().unwrap().to_string();
    let server = routes_server(b, &blobs);
    let (home, images) = manager();
    let err = images
        .pull(&format!("{}/test/app@{good}", server.host()), &quiet())
        .unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.contains(&good_layer) && msg.contains(&served),
        "computed vs expected: {msg}"
    );
    assert!(!images.store().contains(&good_layer.parse().unwrap()));
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial download deleted: {leftovers:?}"
    );
    assert!(images.list().unwrap().is_empty());

    // C: a tag's Docker-Content-Digest header names the other manifest.
    let c = &routes["C_tag_header_lies"];
    let lie = c
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["GET"].as_str().unwrap().ends_with("/latest"))
        .unwrap();
    let body = lie["body_blob"].as_str().unwrap().to_string();
    let header = lie["headers"]["Docker-Content-Digest"]
        .as_str()
        .unwrap()
        .to_string();
    let server = routes_server(c, &blobs);
    let (_home, images) = manager();
    let (record, report) = images
        .pull_with_report(&format!("{}/test/app:latest", server.host()), &quiet())
        .unwrap();
    assert_eq!(record.manifest_digest.to_string(), body);
    assert_eq!(
        record.repo_digest.as_deref(),
        Some(format!("{}/test/app@{body}", server.host()).as_str())
    );
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains(&header) && w.contains(&body)),
        "the lying header is reported: {:?}",
        report.warnings
    );
}

#[test]
fn case19_token_response_shapes() {
    let case = registry::run_case("19-", &[]);
    let responses = json(&case.path().join("token_responses.json"));
    let (manifest, config, layer) = scripted::tiny_image("case 19\n");
    let blobs: HashMap<String, Vec<u8>> = [
        (digest_of(&config), config.clone()),
        (digest_of(&layer), layer.clone()),
    ]
    .into_iter()
    .collect();

    for response in responses.as_array().unwrap() {
        let id = response["id"].as_str().unwrap().to_string();
        let expected = response["expected_bearer"].as_str().map(str::to_string);
        let status = response["status"].as_u64().unwrap() as u16;
        let token_body = match response.get("raw_body") {
            Some(raw) => raw.as_str().unwrap().as_bytes().to_vec(),
            None => serde_json::to_vec(&response["body"]).unwrap(),
        };
        let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let (manifest, blobs, bearer) = (manifest.clone(), blobs.clone(), expected.clone());
        let port_in = port.clone();
        let server = Scripted::start(move |req: &Logged| {
            if req.path() == "/token" {
                return Reply::new(status, token_body.clone())
                    .header("Content-Type", "application/json");
            }
            let want = bearer.as_ref().map(|b| format!("Bearer {b}"));
            if want.is_none() || req.header("Authorization") != want.as_deref() {
                let realm = format!("http://127.0.0.1:{}/token", port_in.get().unwrap());
                return Reply::new(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#).header(
                    "WWW-Authenticate",
                    &format!(
                        r#"Bearer realm="{realm}",service="case19",scope="repository:lib/app:pull""#
                    ),
                );
            }
            if req.path() == "/v2/lib/app/manifests/1" {
                return Reply::new(200, manifest.clone())
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
            }
            if let Some(d) = req.path().strip_prefix("/v2/lib/app/blobs/") {
                if let Some(b) = blobs.get(d) {
                    return Reply::new(200, b.clone());
                }
            }
            Reply::new(404, "")
        });
        port.set(server.port()).unwrap();

        let (_home, images) = manager();
        let result = images.pull(&format!("{}/lib/app:1", server.host()), &quiet());
        let log = server.log();
        let token_requests = log.iter().filter(|r| r.path() == "/token").count();
        match &expected {
            Some(bearer) => {
                result.unwrap_or_else(|e| panic!("{id}: pull failed: {}", chain(&e)));
                let authed: Vec<&Logged> = log
                    .iter()
                    .filter(|r| r.path().starts_with("/v2/lib/"))
                    .collect();
                assert!(authed.len() >= 3, "{id}: manifest, config, layer");
                let last_three = &authed[authed.len() - 3..];
                for r in last_three {
                    assert_eq!(
                        r.header("Authorization"),
                        Some(format!("Bearer {bearer}").as_str()),
                        "{id}: {}",
                        r.url
                    );
                }
                assert_eq!(
                    token_requests, 1,
                    "{id}: the token is reused within its lifetime"
                );
            }
            None => {
                let err = result.expect_err(&id);
                let msg = chain(&err);
                let want = match id.as_str() {
                    "empty-object" => "neither token nor access_token",
                    "html-error" => "not JSON",
                    "denied" => "authentication failed (401)",
                    other => panic!("unknown case {other}"),
                };
                assert!(msg.contains(want), "{id}: {msg}");
                if id == "denied" {
                    assert!(
                        msg.contains("bad credentials"),
                        "the registry's message: {msg}"
                    );
                }
                assert_eq!(token_requests, 1, "{id}: no retry storm");
            }
        }
    }
}

/// Case 21: a registry that wants `tester`/`s3cret-pass`, a manifest whose layer points at an
/// attacker's URL; the attacker must never be contacted, let alone see the credentials.
#[test]
fn case21_foreign_layer_urls_never_see_credentials() {
    let case = registry::run_case("21-", &[]);
    let config = std::fs::read(case.path().join("config.json")).unwrap();
    let layer = std::fs::read(case.path().join("layer.tar.gz")).unwrap();
    let template = std::fs::read_to_string(case.path().join("manifest.json")).unwrap();
    let expected = json(&case.path().join("expected.json"));
    let user = expected["registry_credentials"]["user"]
        .as_str()
        .unwrap()
        .to_string();
    let password = expected["registry_credentials"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:{password}")
        )
    );

    for challenge in ["bearer", "basic"] {
        for flavour in ["docker", "oci"] {
            for registry_has_layer in [true, false] {
                let attacker = Scripted::start(move |_req: &Logged| {
                    let header = if challenge == "bearer" {
                        "Bearer realm=\"http://127.0.0.1:1/token\",service=\"evil\"".to_string()
                    } else {
                        "Basic realm=\"evil\"".to_string()
                    };
                    Reply::new(401, "").header("WWW-Authenticate", &header)
                });
                let mut manifest: serde_json::Value = serde_json::from_str(
                    &template.replace("EVILPORT", &attacker.port().to_string()),
                )
                .unwrap();
                if flavour == "oci" {
                    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
                    manifest["config"]["mediaType"] =
                        "application/vnd.oci.image.config.v1+json".into();
                    manifest["layers"][0]["mediaType"] =
                        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into();
                }
                let manifest = serde_json::to_vec(&manifest).unwrap();
                let media_type = if flavour == "oci" {
                    "application/vnd.oci.image.manifest.v1+json"
                } else {
                    "application/vnd.docker.distribution.manifest.v2+json"
                };
                let layer_digest = digest_of(&layer);
                let (config, layer, basic) = (config.clone(), layer.clone(), basic.clone());
                let served_manifest = manifest.clone();
                let registry = Scripted::start(move |req: &Logged| {
                    if req.header("Authorization") != Some(basic.as_str()) {
                        return Reply::new(401, "")
                            .header("WWW-Authenticate", "Basic realm=\"registry\"");
                    }
                    if req.path() == "/v2/app/foreign/manifests/1" {
                        return Reply::new(200, served_manifest.clone())
                            .header("Content-Type", media_type);
                    }
                    if req.path() == format!("/v2/app/foreign/blobs/{}", digest_of(&config)) {
                        return Reply::new(200, config.clone());
                    }
                    if registry_has_layer
                        && req.path() == format!("/v2/app/foreign/blobs/{}", digest_of(&layer))
                    {
                        return Reply::new(200, layer.clone());
                    }
                    Reply::new(404, r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#)
                });

                let (_home, images) = manager();
                images
                    .credentials()
                    .save(
                        &registry.host(),
                        &Credential::new(user.clone(), password.clone()),
                    )
                    .unwrap();
                let what =
                    format!("{challenge}/{flavour}/registry has layer: {registry_has_layer}");
                let result = images.pull(&format!("{}/app/foreign:1", registry.host()), &quiet());
                if registry_has_layer {
                    let record = result.unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
                    assert_eq!(record.layers[0].digest.to_string(), layer_digest);
                    assert_eq!(images.storage().extractions(), 1, "{what}");
                } else {
                    let msg = chain(&result.expect_err(&what));
                    assert!(
                        msg.contains("foreign layer URL not allowed"),
                        "{what}: {msg}"
                    );
                }
                assert!(
                    attacker.log().is_empty(),
                    "{what}: the foreign host was contacted: {:?}",
                    attacker.log()
                );
                // The registry did get the credentials: they were meant for it.
                assert!(registry
                    .log()
                    .iter()
                    .any(|r| r.header("Authorization").is_some()));
            }
        }
    }
}

#[test]
fn case15_bomb_and_wrong_diff_id_are_refused_on_pull() {
    let case = registry::run_case("15-", &["256"]);
    let expected = json(&case.path().join("expected.json"));
    let reg = registry::Registry::start(registry::Auth::None);
    for layout in ["bomb", "baddiff"] {
        reg.push(
            &format!("oci:{}:latest", case.path().join(layout).display()),
            &format!("case15/{layout}:1"),
            &[],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let home = Home::open(dir.path()).unwrap();
    let settings = ImageSettings {
        max_layer_size: 64 << 20,
        ..ImageSettings::default()
    };
    let images = ImageManager::with_settings(&home, settings).unwrap();

    // The bomb: refused at the limit, nothing left behind.
    let bomb = &expected["bomb"];
    let layer_digest = bomb["layer_digest"].as_str().unwrap();
    let err = images
        .pull(&format!("{}/case15/bomb:1", reg.host()), &quiet())
        .unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains(layer_digest), "names the layer: {msg}");
    assert!(
        msg.contains(&(64u64 << 20).to_string()) || msg.contains("64 MiB"),
        "names the limit: {msg}"
    );
    let diff_id: Digest = bomb["diff_id"].as_str().unwrap().parse().unwrap();
    assert!(!images.storage().has_layer(&diff_id));
    assert!(images.storage().list_layers().unwrap().is_empty());
    assert!(images.list().unwrap().is_empty(), "no image recorded");
    assert!(
        !images.store().contains(&layer_digest.parse().unwrap()),
        "the useless bomb blob is not kept"
    );
    let tmp_left: Vec<_> = std::fs::read_dir(home.tmp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(tmp_left.is_empty(), "staging released: {tmp_left:?}");

    // The lying config: the compressed digest verifies, then the diff_id check refuses it.
    let bad = &expected["baddiff"];
    let err = images
        .pull(&format!("{}/case15/baddiff:1", reg.host()), &quiet())
        .unwrap_err();
    let msg = chain(&err);
    for key in ["true_diff_id", "config_diff_id"] {
        assert!(msg.contains(bad[key].as_str().unwrap()), "{key} in: {msg}");
    }
    for key in ["true_diff_id", "config_diff_id"] {
        let d: Digest = bad[key].as_str().unwrap().parse().unwrap();
        assert!(!images.storage().has_layer(&d), "{key} not committed");
    }
    assert_eq!(reg.blob_gets(bad["layer_digest"].as_str().unwrap()), 1);
}
