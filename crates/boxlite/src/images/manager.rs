//! [`ImageManager`]: the one door to images for the runtime and the CLI. It ties the blob store
//! ([`ImageStore`]), the extracted-layer cache ([`ImageStorage`]), pulls and imports together and
//! keeps the image records in the state database (tables `images` and `image_references`).
//!
//! An image is known by its id, the digest of its config (as in Docker); references
//! (`127.0.0.1:5000/app:1`) point at one image each, and pulling a tag again moves it. Removal
//! is garbage collection: a blob or an extracted layer stays as long as any remaining image
//! names it, and nothing an in-use image needs is deleted (the caller passes the in-use set,
//! since Boxes are the runtime's business).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::home::Home;
use crate::images::assemble::{self, AssembleError, AssembleMode};
use crate::images::digest::{DiffId, Digest};
use crate::images::import::{self, ImportError};
use crate::images::manifest::{Descriptor, RunConfig};
use crate::images::pull::{self, PullError, PullOptions, PullReport, StoredImage};
use crate::images::reference::{InvalidReference, Reference};
use crate::images::registry::{
    Credential, CredentialStore, ImageSettings, RegistryClient, RegistryError,
};
use crate::images::storage::{ImageStorage, LayerBlob, Limits, StorageError};
use crate::images::store::{self, ImageStore, StoreError};
use crate::state::Db;

/// One image as boxlite knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The digest of the image config.
    pub id: Digest,
    /// References (normalised, e.g. `docker.io/library/alpine:latest`) that point here.
    #[serde(default)]
    pub references: Vec<String>,
    /// `name@sha256:…` of what the registry served for the reference (index or manifest).
    #[serde(default)]
    pub repo_digest: Option<String>,
    /// The digest of the platform manifest.
    pub manifest_digest: Digest,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    /// Env, Entrypoint, Cmd, WorkingDir, User, ExposedPorts, Labels.
    #[serde(default)]
    pub config: RunConfig,
    /// Uncompressed layer digests, base first.
    pub diff_ids: Vec<DiffId>,
    /// The layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// Every blob the image keeps alive (index, manifest, config, layers).
    #[serde(default)]
    pub blobs: Vec<Digest>,
    /// Bytes of the layer blobs as stored (compressed).
    pub size: u64,
    /// When the image was recorded (seconds since the epoch).
    pub created_at: i64,
}

/// What a prune or removal freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// References removed (`image rm`), in the order removed.
    pub untagged: Vec<String>,
    pub images_removed: Vec<Digest>,
    pub blobs_removed: usize,
    pub layers_removed: usize,
    pub bytes_freed: u64,
}

/// Errors of the image facade.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] InvalidReference),
    #[error(transparent)]
    Pull(Box<PullError>),
    #[error(transparent)]
    Import(Box<ImportError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("{query:?} matches several images: {matches}")]
    Ambiguous { query: String, matches: String },
    #[error(
        "image {query} ({id}) is referenced by several names ({references}): remove them one \
         by one, or all of them with --force"
    )]
    SeveralReferences {
        query: String,
        id: Digest,
        references: String,
    },
    #[error("image {id} ({reference}) is used by a Box; remove the Box first")]
    InUse { id: Digest, reference: String },
    #[error("image database")]
    Db(#[from] rusqlite::Error),
    #[error("image record {id} in the database is unreadable")]
    BadRecord {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("extracting layer {digest} of image {id}")]
    Layer {
        id: Digest,
        digest: Digest,
        #[source]
        source: Box<StorageError>,
    },
    #[error("layer cache")]
    LayerCache(#[source] Box<StorageError>),
    #[error("unpacking image {id} into {path}")]
    Unpack {
        id: Digest,
        path: PathBuf,
        #[source]
        source: Box<AssembleError>,
    },
}

impl From<PullError> for ImageError {
    fn from(e: PullError) -> ImageError {
        ImageError::Pull(Box::new(e))
    }
}

impl From<ImportError> for ImageError {
    fn from(e: ImportError) -> ImageError {
        ImageError::Import(Box::new(e))
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Images of one home folder.
///
/// ```no_run
/// use boxlite::home::Home;
/// use boxlite::images::manager::ImageManager;
/// use boxlite::images::pull::PullOptions;
/// let images = ImageManager::new(&Home::from_env()?)?;
/// let image = images.pull("127.0.0.1:5000/app:1", &PullOptions::default())?;
/// println!("{} {:?}", image.id, image.config.cmd);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ImageManager {
    home: Home,
    store: ImageStore,
    storage: ImageStorage,
    settings: ImageSettings,
    credentials: CredentialStore,
    db: Mutex<Db>,
}

impl ImageManager {
    /// Opens the images of `home` with the settings of its config file.
    pub fn new(home: &Home) -> Result<ImageManager> {
        let settings = ImageSettings::load(home)?;
        ImageManager::with_settings(home, settings)
    }

    /// Opens the images of `home` with explicit settings.
    pub fn with_settings(home: &Home, settings: ImageSettings) -> Result<ImageManager> {
        Ok(ImageManager {
            home: home.clone(),
            store: ImageStore::new(home),
            storage: ImageStorage::new(home),
            settings,
            credentials: CredentialStore::new(home),
            db: Mutex::new(Db::open(home)?),
        })
    }

    pub fn settings(&self) -> &ImageSettings {
        &self.settings
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// The extracted-layer cache.
    pub fn storage(&self) -> &ImageStorage {
        &self.storage
    }

    pub fn credentials(&self) -> &CredentialStore {
        &self.credentials
    }

    /// Pulls `reference` and records it.
    pub fn pull(&self, reference: &str, options: &PullOptions) -> Result<ImageRecord> {
        self.pull_with_report(reference, options).map(|(r, _)| r)
    }

    /// Pulls `reference`, and says what the pull had to do.
    pub fn pull_with_report(
        &self,
        reference: &str,
        options: &PullOptions,
    ) -> Result<(ImageRecord, PullReport)> {
        let reference: Reference = reference.parse()?;
        let mut report = PullReport::default();
        let limits = self.limits();
        // Layers are extracted while they download, each by its own thread following the
        // download. A layer it could not finish because the download did not feed it from the
        // first byte to verification is extracted from the stored blob by prepare_layers; one
        // whose content failed is refused as it is, not extracted a second time.
        let streamed = Mutex::new(0usize);
        let refused = Mutex::new(None);
        let image = std::thread::scope(|scope| {
            let start = |layer: &Descriptor, diff_id: &DiffId| {
                if self.storage.has_layer(diff_id) {
                    return None;
                }
                let (tee, reader) = store::tee();
                let broken = reader.abandoned();
                let (layer, diff_id) = (layer.clone(), diff_id.clone());
                let (streamed, refused) = (&streamed, &refused);
                scope.spawn(move || {
                    let result = self.storage.ensure_layer_streamed(
                        reader,
                        layer.size,
                        &layer.media_type,
                        &layer.digest,
                        &diff_id,
                        &limits,
                    );
                    match result {
                        Ok(info) if info.extracted => *streamed.lock().expect("count") += 1,
                        Ok(_) => {}
                        Err(e) if broken.load(Ordering::Relaxed) => debug!(
                            digest = %layer.digest, error = %e,
                            "not extracted while downloading; extracting from the store"
                        ),
                        Err(e) => {
                            refused
                                .lock()
                                .expect("refused")
                                .get_or_insert((layer.digest, e));
                        }
                    }
                });
                Some(tee)
            };
            pull::pull(
                &self.store,
                &self.settings,
                &self.credentials,
                &reference,
                options,
                &mut report,
                Some(&start),
            )
        })?;
        if let Some((digest, source)) = refused.into_inner().expect("refused") {
            self.drop_unrecorded_blob(&digest);
            return Err(ImageError::Layer {
                id: image.config_digest.clone(),
                digest,
                source: Box::new(source),
            });
        }
        let show = !options.quiet && std::io::stderr().is_terminal();
        let (extracted, present) = self.prepare_layers(&image, show)?;
        let streamed = streamed.into_inner().expect("count");
        report.layers_streamed = streamed;
        report.layers_extracted = extracted + streamed;
        report.layers_present = present.saturating_sub(streamed);
        let record = self.record(&image, &[reference])?;
        Ok((record, report))
    }

    /// Imports an OCI layout directory, an oci-archive tar or a `docker save` tar; `tag` names
    /// the image (else the names the archive carries).
    pub fn import(&self, path: &Path, tag: Option<&str>) -> Result<ImageRecord> {
        let tag: Option<Reference> = tag.map(str::parse).transpose()?;
        let imported = import::import(&self.store, path, tag.as_ref())?;
        self.prepare_layers(&imported.image, false)?;
        self.record(&imported.image, &imported.references)
    }

    /// Checks `credential` against `registry` (`GET /v2/` through its auth challenge) and, if
    /// accepted, stores it for later pulls.
    pub fn login(&self, registry: &str, credential: Credential) -> Result<()> {
        let reference: Reference = format!("{registry}/probe").parse()?;
        let endpoint = RegistryClient::endpoint_for(reference.api_host(), &self.settings);
        let client = RegistryClient::new(
            reference.registry(),
            &endpoint,
            Some(credential.clone()),
            &self.settings,
        );
        client.ping()?;
        self.credentials.save(reference.registry(), &credential)?;
        Ok(())
    }

    /// Forgets the stored credential of `registry`; false when there was none.
    pub fn logout(&self, registry: &str) -> Result<bool> {
        let reference: Reference = format!("{registry}/probe").parse()?;
        Ok(self.credentials.remove(reference.registry())?)
    }

    /// The image named by a reference, a repo digest, or an id (or unique id prefix).
    pub fn get(&self, query: &str) -> Result<ImageRecord> {
        if let Ok(reference) = query.parse::<Reference>() {
            let name = reference.to_string();
            let db = self.db.lock().expect("db");
            let id: Option<String> = db
                .conn()
                .query_row(
                    "SELECT image_id FROM image_references WHERE reference = ?1",
                    params![name],
                    |row| row.get(0),
                )
                .optional()?;
            drop(db);
            if let Some(id) = id {
                return self.load(&id);
            }
            if let Some(found) = self
                .list()?
                .into_iter()
                .find(|r| r.repo_digest.as_deref() == Some(name.as_str()))
            {
                return Ok(found);
            }
        }
        let prefix = query.strip_prefix("sha256:").unwrap_or(query);
        if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<ImageRecord> = self
                .list()?
                .into_iter()
                .filter(|r| r.id.hex().starts_with(prefix))
                .collect();
            match matches.len() {
                0 => {}
                1 => return Ok(matches.into_iter().next().expect("one")),
                _ => {
                    return Err(ImageError::Ambiguous {
                        query: query.to_string(),
                        matches: matches
                            .iter()
                            .map(|r| r.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        Err(ImageError::NotFound(query.to_string()))
    }

    /// Every image, newest first.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let db = self.db.lock().expect("db");
        let mut stmt = db
            .conn()
            .prepare("SELECT id FROM images ORDER BY created_at DESC, id")?;
        let ids: Vec<String> = stmt
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        drop(stmt);
        drop(db);
        ids.iter().map(|id| self.load(id)).collect()
    }

    /// Removes the reference `query` (or, given an id, the image with all its references).
    /// When no reference is left the image goes, with the blobs and layers no other image
    /// uses. An image in `in_use` (ids) is never removed.
    pub fn remove(&self, query: &str, in_use: &[Digest]) -> Result<PruneReport> {
        self.remove_with(query, in_use, true)
    }

    /// [`Self::remove`], where an id naming an image with several references removes it only
    /// with `force` (as `docker rmi` does); a reference removes only itself either way.
    pub fn remove_with(&self, query: &str, in_use: &[Digest], force: bool) -> Result<PruneReport> {
        let record = self.get(query)?;
        let by_reference = query
            .parse::<Reference>()
            .ok()
            .map(|r| r.to_string())
            .filter(|r| record.references.contains(r));
        if by_reference.is_none() && record.references.len() > 1 && !force {
            return Err(ImageError::SeveralReferences {
                query: query.to_string(),
                id: record.id.clone(),
                references: record.references.join(", "),
            });
        }
        let remaining = match &by_reference {
            Some(r) => record.references.iter().filter(|x| *x != r).count(),
            None => 0,
        };
        if remaining == 0 && in_use.contains(&record.id) {
            return Err(ImageError::InUse {
                id: record.id.clone(),
                reference: query.to_string(),
            });
        }
        {
            let mut db = self.db.lock().expect("db");
            let tx = db.conn_mut().transaction()?;
            match &by_reference {
                Some(r) => {
                    tx.execute(
                        "DELETE FROM image_references WHERE reference = ?1",
                        params![r],
                    )?;
                }
                None => {
                    tx.execute(
                        "DELETE FROM image_references WHERE image_id = ?1",
                        params![record.id.to_string()],
                    )?;
                }
            }
            if remaining == 0 {
                tx.execute(
                    "DELETE FROM images WHERE id = ?1",
                    params![record.id.to_string()],
                )?;
            }
            tx.commit()?;
        }
        let mut report = PruneReport {
            untagged: match by_reference {
                Some(r) => vec![r],
                None => record.references.clone(),
            },
            ..PruneReport::default()
        };
        if remaining == 0 {
            info!(id = %record.id, "image removed");
            report.images_removed.push(record.id.clone());
            self.collect_garbage(&mut report)?;
        }
        Ok(report)
    }

    /// Removes images that no reference names (and no Box uses), then every blob, extracted
    /// layer and stale partial download that no remaining image needs.
    pub fn prune(&self, in_use: &[Digest]) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        for record in self.list()? {
            if record.references.is_empty() && !in_use.contains(&record.id) {
                let db = self.db.lock().expect("db");
                db.conn().execute(
                    "DELETE FROM images WHERE id = ?1",
                    params![record.id.to_string()],
                )?;
                report.images_removed.push(record.id.clone());
            }
        }
        self.collect_garbage(&mut report)?;
        self.storage
            .clean_stale_staging()
            .map_err(|e| ImageError::LayerCache(Box::new(e)))?;
        report.bytes_freed += self.store.remove_stale_partials()?;
        Ok(report)
    }

    /// Deletes what no image record needs any more.
    fn collect_garbage(&self, report: &mut PruneReport) -> Result<()> {
        let records = self.list()?;
        let keep_blobs: HashSet<&Digest> = records
            .iter()
            .flat_map(|r| r.blobs.iter().chain(r.layers.iter().map(|l| &l.digest)))
            .collect();
        for digest in self.store.list()? {
            if !keep_blobs.contains(&digest) {
                let size = std::fs::metadata(self.store.blob_path(&digest))
                    .map(|m| m.len())
                    .unwrap_or(0);
                self.store.remove(&digest)?;
                report.blobs_removed += 1;
                report.bytes_freed += size;
                debug!(%digest, "blob removed");
            }
        }
        let keep_layers: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.diff_ids.iter().map(|d| d.hex()))
            .collect();
        report.layers_removed += self.remove_unused_layers(&keep_layers)?;
        let keep_ids: HashSet<&str> = records.iter().map(|r| r.id.hex()).collect();
        self.remove_unused_rootfs(&keep_ids)?;
        Ok(())
    }

    fn remove_unused_layers(&self, keep: &HashSet<&str>) -> Result<usize> {
        let mut removed = 0;
        for diff_id in self
            .storage
            .list_layers()
            .map_err(|e| ImageError::LayerCache(Box::new(e)))?
        {
            if !keep.contains(diff_id.hex()) {
                self.storage
                    .remove_layer(&diff_id)
                    .map_err(|e| ImageError::LayerCache(Box::new(e)))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Base images (`images/rootfs/<id>.<fmt>`) of images that are gone.
    /// Removes base disks of images that are gone, but never one that a Box's disk still backs
    /// onto (its chain is walked; if any Box's chain cannot be read, nothing is removed).
    fn remove_unused_rootfs(&self, keep: &HashSet<&str>) -> Result<()> {
        let box_ids: Vec<String> = {
            let db = self.db.lock().expect("db");
            let mut stmt = db.conn().prepare("SELECT id FROM boxes")?;
            let ids = stmt
                .query_map([], |row| row.get(0))?
                .collect::<std::result::Result<_, _>>()?;
            ids
        };
        let box_refs: Vec<&str> = box_ids.iter().map(String::as_str).collect();
        let keep_ids: Vec<&str> = keep.iter().copied().collect();
        let unused = match crate::rootfs::gc::unreferenced(&self.home, &keep_ids, &box_refs) {
            Ok(unused) => unused,
            Err(e) => {
                tracing::warn!("keeping every base disk: a Box disk chain cannot be read: {e}");
                return Ok(());
            }
        };
        for path in unused {
            let in_rootfs = path.parent() == Some(self.home.rootfs_dir().as_path());
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if in_rootfs && Digest::from_hex(&stem).is_ok() && !keep.contains(stem.as_str()) {
                remove_path(&path)?;
                let _ = std::fs::remove_file(path.with_extension("lock"));
            }
        }
        Ok(())
    }

    fn load(&self, id: &str) -> Result<ImageRecord> {
        let db = self.db.lock().expect("db");
        let json: String = db
            .conn()
            .query_row(
                "SELECT record FROM images WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| ImageError::NotFound(id.to_string()))?;
        let mut record: ImageRecord =
            serde_json::from_str(&json).map_err(|source| ImageError::BadRecord {
                id: id.to_string(),
                source,
            })?;
        let mut stmt = db.conn().prepare(
            "SELECT reference FROM image_references WHERE image_id = ?1 ORDER BY reference",
        )?;
        record.references = stmt
            .query_map(params![id], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(record)
    }

    /// Writes the record of `image` and points `references` at it (moving them if needed).
    fn record(&self, image: &StoredImage, references: &[Reference]) -> Result<ImageRecord> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let record = ImageRecord {
            id: image.config_digest.clone(),
            references: Vec::new(),
            repo_digest: image.repo_digest.as_ref().map(|r| r.to_string()),
            manifest_digest: image.manifest_digest.clone(),
            os: image.config.os.clone(),
            architecture: image.config.architecture.clone(),
            config: image.config.config.clone().unwrap_or_default(),
            diff_ids: image.config.rootfs.diff_ids.clone(),
            layers: image.manifest.layers.clone(),
            blobs: image.blobs.clone(),
            size: image.manifest.layers.iter().map(|l| l.size).sum(),
            created_at: now,
        };
        let json = serde_json::to_string(&record).expect("image record serialises");
        let id = record.id.to_string();
        {
            let mut db = self.db.lock().expect("db");
            let tx = db.conn_mut().transaction()?;
            tx.execute(
                "INSERT INTO images (id, manifest_digest, record, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET manifest_digest = ?2, record = ?3, created_at = ?4",
                params![id, record.manifest_digest.to_string(), json, now],
            )?;
            for reference in references {
                tx.execute(
                    "INSERT INTO image_references (reference, image_id) VALUES (?1, ?2)
                     ON CONFLICT(reference) DO UPDATE SET image_id = ?2",
                    params![reference.to_string(), id],
                )?;
            }
            tx.commit()?;
        }
        self.load(&id)
    }

    /// Writes the root filesystem of image `query` into `dir` (missing or empty): every layer
    /// applied in order, files copied (the tree is the caller's to change).
    pub fn unpack(&self, query: &str, dir: &Path) -> Result<assemble::AssembleStats> {
        let record = self.get(query)?;
        self.assemble_rootfs(&record, dir, AssembleMode::Copy)
    }

    /// Writes the root filesystem of `record` into `dir` (missing or empty), extracting layers
    /// that are not in the cache yet. `Link` mode is for trees that stay read-only on the same
    /// filesystem as the cache (building base disks).
    pub fn assemble_rootfs(
        &self,
        record: &ImageRecord,
        dir: &Path,
        mode: AssembleMode,
    ) -> Result<assemble::AssembleStats> {
        self.ensure_layers(&record.id, &record.layers, &record.diff_ids, false)?;
        assemble::assemble(&self.storage, &record.diff_ids, dir, mode).map_err(|source| {
            ImageError::Unpack {
                id: record.id.clone(),
                path: dir.to_path_buf(),
                source: Box::new(source),
            }
        })
    }

    /// Extracts the image's layers into the shared layer cache; returns (extracted, present).
    fn prepare_layers(&self, image: &StoredImage, show: bool) -> Result<(usize, usize)> {
        let result = self.ensure_layers(
            &image.config_digest,
            &image.manifest.layers,
            &image.config.rootfs.diff_ids,
            show,
        );
        if let Err(ImageError::Layer { digest, .. }) = &result {
            self.drop_unrecorded_blob(digest);
        }
        result
    }

    /// Makes sure every layer is extracted (each diff_id once, shared across images). Layers
    /// are independent in the cache, so several are extracted at once.
    fn ensure_layers(
        &self,
        id: &Digest,
        layers: &[Descriptor],
        diff_ids: &[DiffId],
        show_progress: bool,
    ) -> Result<(usize, usize)> {
        let progress = show_progress.then(MultiProgress::new);
        let limits = self.limits();
        // Images repeat layers (empty ones above all): each diff_id once.
        let mut seen = HashSet::new();
        let work: Vec<(&Descriptor, &DiffId)> = layers
            .iter()
            .zip(diff_ids)
            .filter(|(_, d)| seen.insert(*d))
            .collect();
        let queue = Mutex::new(work.into_iter());
        let results = Mutex::new(Vec::new());
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4)
            .min(layers.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let Some((layer, diff_id)) = queue.lock().expect("queue").next() else {
                        return;
                    };
                    let path = self.store.blob_path(&layer.digest);
                    let blob = LayerBlob {
                        path: &path,
                        media_type: &layer.media_type,
                        digest: &layer.digest,
                    };
                    let spinner = progress.as_ref().map(|p| extracting(p, &layer.digest));
                    let result = self.storage.ensure_layer(&blob, diff_id, &limits);
                    if let Some(spinner) = spinner {
                        spinner.finish_with_message(match &result {
                            Ok(info) if info.extracted => "extracted",
                            Ok(_) => "already extracted",
                            Err(_) => "failed",
                        });
                    }
                    let failed = result.is_err();
                    results.lock().expect("results").push((layer, result));
                    if failed {
                        // Stop taking new layers; the first error is reported.
                        queue.lock().expect("queue").by_ref().for_each(drop);
                    }
                });
            }
        });

        let (mut extracted, mut present) = (0, 0);
        for (layer, result) in results.into_inner().expect("results") {
            let info = result.map_err(|source| ImageError::Layer {
                id: id.clone(),
                digest: layer.digest.clone(),
                source: Box::new(source),
            })?;
            if info.extracted {
                extracted += 1;
            } else {
                present += 1;
            }
        }
        Ok((extracted, present))
    }

    /// Bounds on one layer's extraction, from the settings.
    fn limits(&self) -> Limits {
        Limits {
            max_uncompressed_bytes: self.settings.max_layer_size,
            ..Limits::default()
        }
    }

    /// A layer blob that could not be extracted is no use; unless a recorded image holds it,
    /// its disk space goes back.
    fn drop_unrecorded_blob(&self, digest: &Digest) {
        let held = self
            .list()
            .map(|records| records.iter().any(|r| r.blobs.contains(digest)))
            .unwrap_or(true);
        if !held {
            let _ = self.store.remove(digest);
        }
    }
}

/// A spinner line for one layer being extracted.
fn extracting(progress: &MultiProgress, digest: &Digest) -> ProgressBar {
    let spinner = progress.add(ProgressBar::new_spinner());
    if let Ok(style) = ProgressStyle::with_template("{prefix} {spinner} {msg}") {
        spinner.set_style(style);
    }
    spinner.set_prefix(digest.hex()[..12].to_string());
    spinner.set_message("extracting");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner
}

fn remove_path(path: &Path) -> Result<()> {
    let result = if path.is_dir() && !path.is_symlink() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageError::Io {
            action: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public image types can be shared across threads, as the runtime does.
    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync + std::fmt::Debug>() {}
        check::<ImageManager>();
        check::<ImageRecord>();
        check::<PruneReport>();
        check::<ImageError>();
        check::<PullReport>();
        check::<PullOptions>();
        check::<Reference>();
        check::<ImageStore>();
        check::<RegistryClient>();
        check::<CredentialStore>();
        check::<ImageSettings>();
    }

    #[test]
    fn records_keep_loading_with_unknown_fields() {
        let json = r#"{"id":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "manifest_digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "diff_ids":[],"layers":[],"size":0,"created_at":1,"added_later":{"x":1}}"#;
        let record: ImageRecord = serde_json::from_str(json).unwrap();
        assert!(record.references.is_empty() && record.blobs.is_empty());
    }
}
