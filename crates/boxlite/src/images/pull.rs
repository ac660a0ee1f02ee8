//! Pulling an image from a registry into the blob store (distribution spec v1.1 "pull",
//! OCI image spec v1.1 index/manifest/config, Docker manifest v2 schema 2).
//!
//! Steps: resolve the reference to a manifest (through an index to the wanted platform), check
//! every document against the digest it was asked by, fetch the config, then download the
//! missing layers concurrently (bounded) with retries and progress. Trust rules:
//! - A manifest asked for by digest must hash to that digest, or the pull stops before any blob
//!   it names is fetched.
//! - `Docker-Content-Digest` is a claim: a tag's manifest is known by the digest of its body; a
//!   header that disagrees is reported in [`PullReport::warnings`] and otherwise ignored.
//! - Every blob is verified by size and digest while it streams ([`ImageStore::fetch`]).
//! - Layer `urls` (foreign / non-distributable layers) are never followed: the registry is asked
//!   for the digest like any other layer, so no third host ever sees a request or a credential.
//!
//! Extracting the layers and recording the image is the manager's part.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{debug, info, warn};

use crate::images::archive::{ArchiveError, Compression};
use crate::images::digest::{DiffId, Digest};
use crate::images::manifest::{
    Descriptor, ImageConfigFile, Manifest, ManifestError, ManifestKind, Platform, DOCKER_CONFIG,
    OCI_CONFIG,
};
use crate::images::reference::Reference;
use crate::images::registry::{
    CredentialStore, FetchedManifest, ImageSettings, RegistryClient, RegistryError,
};
use crate::images::store::{Fetched, ImageStore, StoreError, Tee};

/// Attempts per blob for transient failures (each attempt resumes where the last stopped).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Platform to pick from an index; `linux/amd64` when unset.
    pub platform: Option<Platform>,
    /// No progress bars even on a terminal.
    pub quiet: bool,
    /// Extra registries to reach over plain HTTP (as `--insecure-registry`).
    pub insecure_registries: Vec<String>,
}

/// What a pull did, for users and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Blobs (config and layers) downloaded, fully or by resuming.
    pub blobs_downloaded: usize,
    /// Blobs that were already in the store.
    pub blobs_present: usize,
    /// Bytes received for blobs.
    pub bytes_downloaded: u64,
    /// Layers extracted by this pull, and layers already extracted for another image.
    pub layers_extracted: usize,
    pub layers_present: usize,
    /// Of `layers_extracted`, those extracted while they downloaded.
    pub layers_streamed: usize,
    /// Things the user should know that did not stop the pull.
    pub warnings: Vec<String>,
}

/// Errors of a pull; each names the reference or digest involved.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling {reference}")]
    Registry {
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error("manifest digest mismatch for {reference}: asked for {expected}, received content with digest {actual}")]
    ManifestDigestMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("manifest of {reference}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error("{reference} has no image for platform {platform} (available: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("{reference}: an index entry {digest} points to another index; nested indexes are not supported")]
    NestedIndex { reference: String, digest: Digest },
    #[error("{reference} is not a container image (config media type {media_type:?})")]
    NotAnImage {
        reference: String,
        media_type: String,
    },
    #[error("{what} {digest} has {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        what: &'static str,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("image config {digest} is malformed")]
    Config {
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
    #[error("image config {digest} lists {diff_ids} diff_ids for {layers} layers")]
    LayerCount {
        digest: Digest,
        layers: usize,
        diff_ids: usize,
    },
    #[error("{what} {digest} exceeds the {limit} byte limit for documents")]
    DocumentTooLarge {
        what: &'static str,
        digest: Digest,
        limit: u64,
    },
    #[error("layer {digest} is a foreign layer that the registry does not hold; foreign layer URL not allowed (boxlite never follows layer urls)")]
    ForeignLayer {
        digest: Digest,
        #[source]
        source: Box<StoreError>,
    },
    #[error("fetching {what} {digest} of {reference}")]
    Blob {
        what: &'static str,
        reference: String,
        digest: Digest,
        #[source]
        source: Box<StoreError>,
    },
    #[error("{reference}: layer {digest}")]
    UnsupportedLayer {
        reference: String,
        digest: Digest,
        #[source]
        source: ArchiveError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A pulled or imported image's documents, all verified and in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The reference as pulled, pinned to the digest that was resolved (`name@sha256:…` of the
    /// tag's manifest or index); none for an import.
    pub repo_digest: Option<Reference>,
    pub manifest_digest: Digest,
    pub manifest: Manifest,
    pub config_digest: Digest,
    pub config: ImageConfigFile,
    /// Every blob the image needs kept: index (if any), manifest, config and layers.
    pub blobs: Vec<Digest>,
}

/// Called for each layer whose download is about to start, with its diff_id; a [`Tee`] it
/// returns is handed the layer's bytes as they arrive ([`ImageStore::fetch_teed`]), so the
/// layer can be extracted while it downloads.
pub type LayerTee<'a> = dyn Fn(&Descriptor, &DiffId) -> Option<Tee> + Sync + 'a;

/// Pulls `reference` into `store`. Layers are downloaded; they are extracted only by whatever
/// `tee_layer` starts.
pub fn pull(
    store: &ImageStore,
    settings: &ImageSettings,
    credentials: &CredentialStore,
    reference: &Reference,
    options: &PullOptions,
    report: &mut PullReport,
    tee_layer: Option<&LayerTee<'_>>,
) -> Result<StoredImage, PullError> {
    let mut settings = settings.clone();
    settings
        .insecure_registries
        .extend(options.insecure_registries.iter().cloned());
    let platform = options
        .platform
        .clone()
        .unwrap_or_else(Platform::default_guest);
    let name = reference.to_string();
    let registry_err = |source| PullError::Registry {
        reference: name.clone(),
        source,
    };

    let (client, fetched) =
        fetch_top_manifest(&settings, credentials, reference, report).map_err(registry_err)?;
    let repo = reference.repository();
    let top_digest = Digest::of(&fetched.body);
    check_top_digest(
        reference,
        &top_digest,
        fetched.header_digest.as_deref(),
        report,
    )?;

    let (documents, manifest_digest, manifest) =
        resolve_manifest(&client, reference, &top_digest, &fetched, &platform)?;
    if !matches!(
        manifest.config.media_type.as_str(),
        OCI_CONFIG | DOCKER_CONFIG
    ) {
        return Err(PullError::NotAnImage {
            reference: name,
            media_type: manifest.config.media_type.clone(),
        });
    }

    let config_desc = &manifest.config;
    if config_desc.size > settings.max_manifest_size {
        return Err(PullError::DocumentTooLarge {
            what: "image config",
            digest: config_desc.digest.clone(),
            limit: settings.max_manifest_size,
        });
    }
    fetch_blob(&client, store, repo, config_desc, None, report).map_err(|source| {
        PullError::Blob {
            what: "config",
            reference: name.clone(),
            digest: config_desc.digest.clone(),
            source: Box::new(source),
        }
    })?;
    let config_bytes = store.read(&config_desc.digest)?;
    let config: ImageConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|source| PullError::Config {
            digest: config_desc.digest.clone(),
            source,
        })?;
    let got = Platform {
        os: config.os.clone(),
        architecture: config.architecture.clone(),
        variant: None,
    };
    let wanted = Platform {
        variant: None,
        ..platform.clone()
    };
    if !wanted.matches(&got) {
        let msg = format!("{name} is built for {got}, not for the requested {platform}");
        warn!("{msg}");
        report.warnings.push(msg);
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(PullError::LayerCount {
            digest: config_desc.digest.clone(),
            layers: manifest.layers.len(),
            diff_ids: config.rootfs.diff_ids.len(),
        });
    }

    for layer in &manifest.layers {
        Compression::from_media_type(&layer.media_type).map_err(|source| {
            PullError::UnsupportedLayer {
                reference: name.clone(),
                digest: layer.digest.clone(),
                source,
            }
        })?;
    }
    download_layers(
        &client,
        store,
        &name,
        repo,
        &manifest.layers,
        &config.rootfs.diff_ids,
        &settings,
        options,
        report,
        tee_layer,
    )?;

    // Only now, with everything verified and present, do the documents enter the store.
    for (digest, body) in &documents {
        store.put_bytes(digest, body, "manifest")?;
    }
    let mut blobs: Vec<Digest> = documents.into_iter().map(|(d, _)| d).collect();
    blobs.push(config_desc.digest.clone());
    blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
    info!(reference = %name, manifest = %manifest_digest, "pulled");
    Ok(StoredImage {
        repo_digest: Some(reference.with_digest(top_digest)),
        manifest_digest,
        config_digest: config_desc.digest.clone(),
        manifest,
        config,
        blobs,
    })
}

/// The platform manifest behind the top document (itself, or the index entry for `platform`),
/// with the documents to store: `(digest, body)` of the top one and of the picked one.
#[allow(clippy::type_complexity)]
fn resolve_manifest(
    client: &RegistryClient,
    reference: &Reference,
    top_digest: &Digest,
    fetched: &FetchedManifest,
    platform: &Platform,
) -> Result<(Vec<(Digest, Vec<u8>)>, Digest, Manifest), PullError> {
    let name = reference.to_string();
    let repo = reference.repository();
    let registry_err = |source| PullError::Registry {
        reference: name.clone(),
        source,
    };
    let kind =
        ManifestKind::parse(&fetched.body, fetched.content_type.as_deref()).map_err(|source| {
            PullError::Manifest {
                reference: name.clone(),
                source,
            }
        })?;
    let mut documents = vec![(top_digest.clone(), fetched.body.clone())];
    let (manifest_digest, manifest) = match kind {
        ManifestKind::Manifest(m) => (top_digest.clone(), m),
        ManifestKind::Index(index) => {
            let Some(entry) = index.select(platform) else {
                return Err(PullError::NoPlatform {
                    reference: name,
                    platform: platform.to_string(),
                    available: index.platforms().join(", "),
                });
            };
            debug!(digest = %entry.digest, %platform, "picked manifest from index");
            let child = manifest_with_retries(client, repo, &entry.digest.to_string())
                .map_err(registry_err)?;
            let body = verified_document(&child.body, entry, &name, "manifest")?;
            match ManifestKind::parse(&body, child.content_type.as_deref()).map_err(|source| {
                PullError::Manifest {
                    reference: name.clone(),
                    source,
                }
            })? {
                ManifestKind::Manifest(m) => {
                    documents.push((entry.digest.clone(), body));
                    (entry.digest.clone(), m)
                }
                ManifestKind::Index(_) => {
                    return Err(PullError::NestedIndex {
                        reference: name,
                        digest: entry.digest.clone(),
                    })
                }
            }
        }
    };
    Ok((documents, manifest_digest, manifest))
}

/// Asks each mirror of the registry, then the registry itself, for the top manifest; the first
/// endpoint that answers serves the whole pull.
fn fetch_top_manifest(
    settings: &ImageSettings,
    credentials: &CredentialStore,
    reference: &Reference,
    report: &mut PullReport,
) -> Result<(RegistryClient, crate::images::registry::FetchedManifest), RegistryError> {
    let upstream = RegistryClient::endpoint_for(reference.api_host(), settings);
    let mirrors = settings
        .mirrors
        .get(reference.registry())
        .cloned()
        .unwrap_or_default();
    for mirror in mirrors {
        let host = mirror
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let credential = credentials.lookup(&host)?;
        let client = RegistryClient::new(reference.registry(), &mirror, credential, settings);
        match client.manifest(reference.repository(), &reference.manifest_reference()) {
            Ok(m) => return Ok((client, m)),
            Err(e) => {
                let msg = format!("mirror {mirror} failed, using {upstream}: {e}");
                warn!("{msg}");
                report.warnings.push(msg);
            }
        }
    }
    let credential = credentials.lookup(reference.registry())?;
    let client = RegistryClient::new(reference.registry(), &upstream, credential, settings);
    let m = manifest_with_retries(
        &client,
        reference.repository(),
        &reference.manifest_reference(),
    )?;
    Ok((client, m))
}

/// A manifest request, retried like blobs when the failure is transient (network, 5xx, 429).
fn manifest_with_retries(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
) -> Result<FetchedManifest, RegistryError> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match client.manifest(repo, reference) {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                warn!(repo, reference, attempt, error = %e, "manifest request failed; retrying");
                std::thread::sleep(backoff);
                backoff *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn check_top_digest(
    reference: &Reference,
    actual: &Digest,
    header: Option<&str>,
    report: &mut PullReport,
) -> Result<(), PullError> {
    if let Some(expected) = reference.digest() {
        if expected != actual {
            return Err(PullError::ManifestDigestMismatch {
                reference: reference.to_string(),
                expected: expected.clone(),
                actual: actual.clone(),
            });
        }
    }
    if let Some(header) = header {
        if header != actual.to_string() {
            let msg = format!(
                "registry's Docker-Content-Digest {header} for {reference} disagrees with the \
                 received manifest's digest {actual}; using {actual}"
            );
            warn!("{msg}");
            report.warnings.push(msg);
        }
    }
    Ok(())
}

/// A child document must match its descriptor's digest and size.
fn verified_document(
    body: &[u8],
    desc: &Descriptor,
    reference: &str,
    what: &'static str,
) -> Result<Vec<u8>, PullError> {
    let actual = Digest::of(body);
    if actual != desc.digest {
        return Err(PullError::ManifestDigestMismatch {
            reference: format!("{reference} ({what})"),
            expected: desc.digest.clone(),
            actual,
        });
    }
    if body.len() as u64 != desc.size {
        return Err(PullError::SizeMismatch {
            what,
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: body.len() as u64,
        });
    }
    Ok(body.to_vec())
}

/// One blob into the store, retrying transient failures with exponential backoff.
fn fetch_blob(
    client: &RegistryClient,
    store: &ImageStore,
    repo: &str,
    desc: &Descriptor,
    bar: Option<&ProgressBar>,
    report: &mut PullReport,
) -> Result<(), StoreError> {
    let outcome = fetch_with_retries(client, store, repo, desc, bar, None)?;
    count(report, outcome);
    Ok(())
}

fn count(report: &mut PullReport, outcome: Fetched) {
    match outcome {
        Fetched::Present => report.blobs_present += 1,
        Fetched::Downloaded { bytes, .. } => {
            report.blobs_downloaded += 1;
            report.bytes_downloaded += bytes;
        }
    }
}

fn fetch_with_retries(
    client: &RegistryClient,
    store: &ImageStore,
    repo: &str,
    desc: &Descriptor,
    bar: Option<&ProgressBar>,
    mut tee: Option<Tee>,
) -> Result<Fetched, StoreError> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        if let Some(bar) = bar {
            bar.set_position(0);
        }
        let mut source = |offset| {
            client
                .blob(repo, &desc.digest, offset)
                .map(|r| (r.reader, r.resumed))
        };
        let progress = |n: u64| {
            if let Some(bar) = bar {
                bar.inc(n);
            }
        };
        // Only the first attempt feeds the tee: a retry resumes mid-blob.
        let tee = tee.take();
        match store.fetch_teed(&desc.digest, desc.size, &mut source, &progress, tee) {
            Ok(outcome) => return Ok(outcome),
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                warn!(digest = %desc.digest, attempt, error = %e, "blob download failed; retrying");
                std::thread::sleep(backoff);
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Downloads the layers that are not in the store yet, a bounded number at a time.
#[allow(clippy::too_many_arguments)]
fn download_layers(
    client: &RegistryClient,
    store: &ImageStore,
    reference: &str,
    repo: &str,
    layers: &[Descriptor],
    diff_ids: &[DiffId],
    settings: &ImageSettings,
    options: &PullOptions,
    report: &mut PullReport,
    tee_layer: Option<&LayerTee<'_>>,
) -> Result<(), PullError> {
    let missing: VecDeque<(&Descriptor, &DiffId)> = layers
        .iter()
        .zip(diff_ids)
        .filter(|(l, _)| {
            let present = store.contains(&l.digest);
            if present {
                report.blobs_present += 1;
            }
            !present
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for layer in layers.iter().filter(|l| !l.urls.is_empty()) {
        debug!(digest = %layer.digest, "foreign layer: its urls are ignored, fetching by digest");
    }

    let bars = Bars::new(!options.quiet && std::io::stderr().is_terminal());
    let queue = Mutex::new(missing);
    let failed = AtomicBool::new(false);
    let results = Mutex::new(Vec::new());
    let workers = settings.max_concurrent_downloads.min(layers.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let Some((layer, diff_id)) = queue.lock().expect("queue").pop_front() else {
                    return;
                };
                let bar = bars.add(layer);
                let tee = tee_layer.and_then(|start| start(layer, diff_id));
                let result = fetch_with_retries(client, store, repo, layer, bar.as_ref(), tee);
                if let Some(bar) = bar {
                    bar.finish();
                }
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                results.lock().expect("results").push((layer, result));
            });
        }
    });

    let mut first_error = None;
    for (layer, result) in results.into_inner().expect("results") {
        match result {
            Ok(outcome) => count(report, outcome),
            Err(source) if first_error.is_none() => {
                first_error = Some(layer_error(reference, layer, source));
            }
            Err(_) => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn layer_error(reference: &str, layer: &Descriptor, source: StoreError) -> PullError {
    let missing = matches!(
        &source,
        StoreError::Registry(RegistryError::NotFound { .. })
    );
    if missing && !layer.urls.is_empty() {
        return PullError::ForeignLayer {
            digest: layer.digest.clone(),
            source: Box::new(source),
        };
    }
    PullError::Blob {
        what: "layer",
        reference: reference.to_string(),
        digest: layer.digest.clone(),
        source: Box::new(source),
    }
}

/// Progress bars on a terminal, nothing otherwise.
struct Bars {
    multi: Option<MultiProgress>,
}

impl Bars {
    fn new(enabled: bool) -> Bars {
        Bars {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    fn add(&self, layer: &Descriptor) -> Option<ProgressBar> {
        let multi = self.multi.as_ref()?;
        let bar = multi.add(ProgressBar::new(layer.size));
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(layer.digest.hex()[..12].to_string());
        Some(bar)
    }
}
