//! `boxlite image import`: images from files instead of a registry. Three shapes are read:
//! - an OCI image layout directory (OCI image spec v1.1 "image layout": `oci-layout`,
//!   `index.json`, `blobs/sha256/<hex>`), as written by `skopeo copy … oci:DIR` or `umoci`;
//! - the same layout as a tar (`oci-archive`, and `docker save` of Docker 25+, which adds
//!   `manifest.json` beside it);
//! - the classic `docker save` tar: `manifest.json` (`[{"Config", "RepoTags", "Layers"}]`) with
//!   a config file and one tar per layer. A Docker schema 2 manifest is written for it, layer
//!   media types taken from the layers' first bytes.
//!
//! Everything that goes into the store is hashed on the way: a file under `blobs/sha256/<hex>`
//! must hash to `<hex>`, and so must every document a manifest points at. A tar is read once,
//! front to back; its big files go straight into the blob store and small JSON stays in memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use crate::images::digest::Digest;
use crate::images::manifest::{
    Descriptor, ImageConfigFile, Index, Manifest, ManifestError, ManifestKind, Platform,
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_MANIFEST,
};
use crate::images::pull::StoredImage;
use crate::images::reference::{InvalidReference, Reference};
use crate::images::store::{ImageStore, StoreError};

/// Small documents of a tar kept in memory (JSON, `oci-layout`); bigger files go to the store.
const MEMORY_LIMIT: u64 = 4 << 20;
const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Errors of an import; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no such file or directory: {0}")]
    NotFound(PathBuf),
    #[error("{path} is not an image: {reason}")]
    NotAnImage { path: PathBuf, reason: String },
    #[error("{path}: {what} is malformed")]
    Json {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{path}: blob {digest} is missing")]
    MissingBlob { path: PathBuf, digest: Digest },
    #[error("{path}: {member} is missing from the archive")]
    MissingMember { path: PathBuf, member: String },
    #[error("{path}: no image for platform {platform} (available: {available})")]
    NoPlatform {
        path: PathBuf,
        platform: String,
        available: String,
    },
    #[error("{path}: image config {digest} lists {diff_ids} diff_ids for {layers} layers")]
    LayerCount {
        path: PathBuf,
        digest: Digest,
        layers: usize,
        diff_ids: usize,
    },
    #[error("{path}: name {name:?} in the archive")]
    Name {
        path: PathBuf,
        name: String,
        #[source]
        source: InvalidReference,
    },
    #[error("{path}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

type Result<T, E = ImportError> = std::result::Result<T, E>;

/// An imported image and the names it should get.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub image: StoredImage,
    pub references: Vec<Reference>,
}

/// Imports the image at `path` into `store`. `tag` replaces the names the archive carries.
///
/// An OCI layout holding several images is read as `PATH:NAME`, NAME being the
/// `org.opencontainers.image.ref.name` of the wanted one (as skopeo's `oci:PATH:NAME`).
pub fn import(store: &ImageStore, path: &Path, tag: Option<&Reference>) -> Result<ImportedImage> {
    let (path, selector) = split_selector(path);
    let path = path.as_path();
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImportError::NotFound(path.to_path_buf()))
        }
        Err(source) => {
            return Err(ImportError::Io {
                action: "opening",
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let mut source = if path.is_dir() {
        Source::Dir(path.to_path_buf())
    } else {
        Source::Tar(read_tar(store, path)?)
    };
    let ctx = Ctx {
        store,
        path,
        selector: selector.as_deref(),
    };
    let mut imported = if source.has("index.json") && source.has("oci-layout") {
        ctx.import_oci(&mut source)?
    } else if source.has("manifest.json") {
        ctx.import_docker(&mut source)?
    } else {
        return Err(ImportError::NotAnImage {
            path: path.to_path_buf(),
            reason: format!(
                "{NOT_AN_ARCHIVE} (it has neither oci-layout and index.json nor manifest.json)"
            ),
        });
    };
    if let Some(tag) = tag {
        imported.references = vec![tag.clone()];
    }
    Ok(imported)
}

/// A file of a tar, once read.
enum Member {
    Memory(Vec<u8>),
    Stored(Digest),
    Link(String),
}

/// Where the archive's files are.
enum Source {
    Dir(PathBuf),
    Tar(HashMap<String, Member>),
}

impl Source {
    fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => dir.join(name).exists(),
            Source::Tar(members) => members.contains_key(name),
        }
    }
}

/// Reads every member of the tar at `path` once: small documents into memory, the rest into
/// the store (verified against its name when it sits under `blobs/sha256/`).
fn read_tar(store: &ImageStore, path: &Path) -> Result<HashMap<String, Member>> {
    let io_err = |action, source| ImportError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| io_err("opening", e))?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for (index, entry) in archive
        .entries()
        .map_err(|e| io_err("reading tar", e))?
        .enumerate()
    {
        let mut entry = entry.map_err(|e| tar_header_error(path, index, e))?;
        let name = normalise(&entry.path_bytes());
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            let target = if kind.is_symlink() {
                resolve_relative(&name, &target)
            } else {
                normalise(target.as_bytes())
            };
            members.insert(name, Member::Link(target));
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| io_err("reading tar", e))?;
        let small_doc = size <= MEMORY_LIMIT
            && (name.ends_with(".json") || name == "oci-layout" || name == "repositories");
        if small_doc {
            let mut bytes = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| io_err("reading tar", e))?;
            members.insert(name, Member::Memory(bytes));
            continue;
        }
        let expected = name
            .strip_prefix("blobs/sha256/")
            .and_then(|hex| Digest::from_hex(hex).ok());
        let (digest, _) = store
            .ingest(
                &mut entry,
                expected.as_ref(),
                &format!("{}:{name}", path.display()),
            )
            .map_err(|source| ImportError::Store {
                path: path.to_path_buf(),
                source,
            })?;
        members.insert(name, Member::Stored(digest));
    }
    Ok(members)
}

/// What `image import` reads, for messages about anything else.
const NOT_AN_ARCHIVE: &str = "not an OCI layout directory, an oci-archive tar or a docker-save tar";

/// A tar header that does not parse. The tar reader's message quotes the header's bytes, which
/// for a file that is no tar at all are its contents: say what is wrong without them.
fn tar_header_error(path: &Path, index: usize, source: std::io::Error) -> ImportError {
    if index == 0 {
        return ImportError::NotAnImage {
            path: path.to_path_buf(),
            reason: format!("{NOT_AN_ARCHIVE} (it does not start with a tar header)"),
        };
    }
    let reason = source.to_string();
    let reason = reason.split([':', '\n']).next().unwrap_or("").trim();
    ImportError::Io {
        action: "reading tar",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            source.kind(),
            format!("the header of member {} is corrupt ({reason})", index + 1),
        ),
    }
}

/// `./a//b` → `a/b`.
fn normalise(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// A symlink target relative to the link's folder, as an archive path.
fn resolve_relative(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        link.split('/').collect()
    };
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// `layout:name` → (`layout`, `name`) when `layout:name` itself does not exist.
fn split_selector(path: &Path) -> (PathBuf, Option<String>) {
    if path.exists() {
        return (path.to_path_buf(), None);
    }
    let text = path.to_string_lossy();
    match text.rsplit_once(':') {
        Some((p, name)) if !name.is_empty() && !name.contains('/') && Path::new(p).exists() => {
            (PathBuf::from(p), Some(name.to_string()))
        }
        _ => (path.to_path_buf(), None),
    }
}

struct Ctx<'a> {
    store: &'a ImageStore,
    path: &'a Path,
    /// The ref name of the wanted image in a layout holding several.
    selector: Option<&'a str>,
}

impl Ctx<'_> {
    fn store_err(&self, source: StoreError) -> ImportError {
        ImportError::Store {
            path: self.path.to_path_buf(),
            source,
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|source| ImportError::Json {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            source,
        })
    }

    /// The bytes of member `name` (following links), small files only.
    fn member(&self, source: &mut Source, name: &str) -> Result<Vec<u8>> {
        self.check_member_name(name)?;
        match source {
            Source::Dir(dir) => {
                let p = dir.join(name);
                std::fs::read(&p).map_err(|source| ImportError::Io {
                    action: "reading",
                    path: p,
                    source,
                })
            }
            Source::Tar(members) => {
                let mut name = name.to_string();
                for _ in 0..16 {
                    match members.get(&name) {
                        Some(Member::Memory(b)) => return Ok(b.clone()),
                        Some(Member::Stored(d)) => {
                            return self.store.read(d).map_err(|e| self.store_err(e))
                        }
                        Some(Member::Link(t)) => name = t.clone(),
                        None => break,
                    }
                }
                Err(ImportError::MissingMember {
                    path: self.path.to_path_buf(),
                    member: name,
                })
            }
        }
    }

    /// Puts blob `digest` of an OCI layout into the store, verified.
    fn oci_blob(&self, source: &mut Source, digest: &Digest) -> Result<()> {
        if self.store.contains(digest) {
            return Ok(());
        }
        let name = format!("blobs/sha256/{}", digest.hex());
        match source {
            Source::Dir(dir) => {
                let p = dir.join(&name);
                let mut file = File::open(&p).map_err(|_| ImportError::MissingBlob {
                    path: self.path.to_path_buf(),
                    digest: digest.clone(),
                })?;
                self.store
                    .ingest(&mut file, Some(digest), &p.display().to_string())
                    .map_err(|e| self.store_err(e))?;
                Ok(())
            }
            Source::Tar(_) => {
                let bytes = self
                    .member(source, &name)
                    .map_err(|_| ImportError::MissingBlob {
                        path: self.path.to_path_buf(),
                        digest: digest.clone(),
                    })?;
                self.store
                    .put_bytes(digest, &bytes, &name)
                    .map_err(|e| self.store_err(e))
            }
        }
    }

    fn oci_document(&self, source: &mut Source, desc: &Descriptor) -> Result<Vec<u8>> {
        self.oci_blob(source, &desc.digest)?;
        self.store.read(&desc.digest).map_err(|e| self.store_err(e))
    }

    fn import_oci(&self, source: &mut Source) -> Result<ImportedImage> {
        let index: Index = self.json(&self.member(source, "index.json")?, "index.json")?;
        let (entry, mut blobs) = self.pick_manifest(source, &index, 0)?;
        let body = self.oci_document(source, &entry)?;
        let manifest =
            match ManifestKind::parse(&body, None).map_err(|source| ImportError::Manifest {
                path: self.path.to_path_buf(),
                source,
            })? {
                ManifestKind::Manifest(m) => m,
                ManifestKind::Index(_) => {
                    return Err(ImportError::NotAnImage {
                        path: self.path.to_path_buf(),
                        reason: format!("{} is an index nested too deep", entry.digest),
                    })
                }
            };
        let config_bytes = self.oci_document(source, &manifest.config)?;
        for layer in &manifest.layers {
            self.oci_blob(source, &layer.digest)?;
        }
        blobs.push(entry.digest.clone());
        let references = names_from_annotations(&entry)
            .into_iter()
            .chain(index.manifests.iter().flat_map(names_from_annotations))
            .take(1)
            .collect();
        let image = self.finish(entry.digest.clone(), manifest, &config_bytes, blobs)?;
        Ok(ImportedImage { image, references })
    }

    /// The manifest descriptor for the guest platform, descending into nested indexes.
    fn pick_manifest(
        &self,
        source: &mut Source,
        index: &Index,
        depth: usize,
    ) -> Result<(Descriptor, Vec<Digest>)> {
        let platform = Platform::default_guest();
        let ref_name = |d: &Descriptor| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .cloned()
        };
        let selected = match self.selector.filter(|_| depth == 0) {
            Some(name) => Some(
                index
                    .manifests
                    .iter()
                    .find(|d| ref_name(d).as_deref() == Some(name))
                    .cloned()
                    .ok_or_else(|| ImportError::NotAnImage {
                        path: self.path.to_path_buf(),
                        reason: format!(
                            "no image named {name:?} in the layout (names: {})",
                            index
                                .manifests
                                .iter()
                                .filter_map(ref_name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })?,
            ),
            None => None,
        };
        let named: Vec<String> = index.manifests.iter().filter_map(ref_name).collect();
        if selected.is_none() && depth == 0 && named.len() > 1 {
            return Err(ImportError::NotAnImage {
                path: self.path.to_path_buf(),
                reason: format!(
                    "the layout holds several images; pick one as PATH:NAME (names: {})",
                    named.join(", ")
                ),
            });
        }
        let entry = if let Some(entry) = selected {
            entry
        } else if index.manifests.len() == 1 {
            index.manifests[0].clone()
        } else {
            index
                .select(&platform)
                .or_else(|| {
                    index
                        .manifests
                        .iter()
                        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
                })
                .cloned()
                .ok_or_else(|| ImportError::NoPlatform {
                    path: self.path.to_path_buf(),
                    platform: platform.to_string(),
                    available: index.platforms().join(", "),
                })?
        };
        let is_index = matches!(
            entry.media_type.as_str(),
            crate::images::manifest::OCI_INDEX | crate::images::manifest::DOCKER_LIST
        );
        if is_index && depth < 2 {
            let body = self.oci_document(source, &entry)?;
            let inner: Index = self.json(&body, &format!("index {}", entry.digest))?;
            let (found, mut blobs) = self.pick_manifest(source, &inner, depth + 1)?;
            blobs.push(entry.digest.clone());
            return Ok((found, blobs));
        }
        Ok((entry, Vec::new()))
    }

    fn import_docker(&self, source: &mut Source) -> Result<ImportedImage> {
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "Config")]
            config: String,
            #[serde(rename = "RepoTags", default)]
            repo_tags: Option<Vec<String>>,
            #[serde(rename = "Layers")]
            layers: Vec<String>,
        }
        let entries: Vec<Entry> =
            self.json(&self.member(source, "manifest.json")?, "manifest.json")?;
        let Some(entry) = entries.into_iter().next() else {
            return Err(ImportError::NotAnImage {
                path: self.path.to_path_buf(),
                reason: "manifest.json lists no image".to_string(),
            });
        };
        let config_bytes = self.member(source, &entry.config)?;
        let config_digest = Digest::of(&config_bytes);
        self.store
            .put_bytes(&config_digest, &config_bytes, &entry.config)
            .map_err(|e| self.store_err(e))?;

        let mut layers = Vec::new();
        for name in &entry.layers {
            let digest = self.docker_layer(source, name)?;
            let size = std::fs::metadata(self.store.blob_path(&digest))
                .map(|m| m.len())
                .unwrap_or(0);
            layers.push(Descriptor {
                media_type: self.sniff_layer_type(&digest)?.to_string(),
                digest,
                size,
                urls: Vec::new(),
                platform: None,
                annotations: Default::default(),
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(DOCKER_MANIFEST.to_string()),
            config: Descriptor {
                media_type: DOCKER_CONFIG.to_string(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                urls: Vec::new(),
                platform: None,
                annotations: Default::default(),
            },
            layers,
        };
        let body = serde_json::to_vec(&manifest).expect("manifest serialises");
        let manifest_digest = Digest::of(&body);
        self.store
            .put_bytes(&manifest_digest, &body, "manifest")
            .map_err(|e| self.store_err(e))?;

        let references = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|name| {
                name.parse::<Reference>()
                    .map_err(|source| ImportError::Name {
                        path: self.path.to_path_buf(),
                        name: name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let image = self.finish(manifest_digest, manifest, &config_bytes, Vec::new())?;
        Ok(ImportedImage { image, references })
    }

    /// Names from an archive's own documents stay inside the archive.
    fn check_member_name(&self, name: &str) -> Result<()> {
        if name.starts_with('/') || name.split('/').any(|c| c == "..") {
            return Err(ImportError::NotAnImage {
                path: self.path.to_path_buf(),
                reason: format!("member name {name:?} points outside the archive"),
            });
        }
        Ok(())
    }

    /// The stored digest of docker-save layer member `name`.
    fn docker_layer(&self, source: &mut Source, name: &str) -> Result<Digest> {
        self.check_member_name(name)?;
        let Source::Tar(members) = source else {
            // A docker-save tree unpacked into a directory.
            let Source::Dir(dir) = source else {
                unreachable!()
            };
            let p = dir.join(name);
            let mut file = File::open(&p).map_err(|e| ImportError::Io {
                action: "opening",
                path: p.clone(),
                source: e,
            })?;
            return self
                .store
                .ingest(&mut file, None, &p.display().to_string())
                .map(|(d, _)| d)
                .map_err(|e| self.store_err(e));
        };
        let mut current = name.to_string();
        for _ in 0..16 {
            match members.get(&current) {
                Some(Member::Stored(d)) => return Ok(d.clone()),
                Some(Member::Memory(bytes)) => {
                    return self
                        .store
                        .ingest(&mut Cursor::new(bytes.clone()), None, name)
                        .map(|(d, _)| d)
                        .map_err(|e| self.store_err(e))
                }
                Some(Member::Link(t)) => current = t.clone(),
                None => break,
            }
        }
        Err(ImportError::MissingMember {
            path: self.path.to_path_buf(),
            member: name.to_string(),
        })
    }

    /// A layer's media type from its first bytes (gzip, zstd or a plain tar).
    fn sniff_layer_type(&self, digest: &Digest) -> Result<&'static str> {
        let p = self.store.blob_path(digest);
        let mut head = [0u8; 4];
        let n = File::open(&p)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|source| ImportError::Io {
                action: "reading",
                path: p,
                source,
            })?;
        Ok(match &head[..n] {
            [0x1f, 0x8b, ..] => DOCKER_LAYER_GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => OCI_LAYER_ZSTD,
            _ => DOCKER_LAYER_TAR,
        })
    }

    fn finish(
        &self,
        manifest_digest: Digest,
        manifest: Manifest,
        config_bytes: &[u8],
        mut blobs: Vec<Digest>,
    ) -> Result<StoredImage> {
        let config: ImageConfigFile = self.json(config_bytes, "image config")?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImportError::LayerCount {
                path: self.path.to_path_buf(),
                digest: manifest.config.digest.clone(),
                layers: manifest.layers.len(),
                diff_ids: config.rootfs.diff_ids.len(),
            });
        }
        for layer in &manifest.layers {
            if !self.store.contains(&layer.digest) {
                return Err(ImportError::MissingBlob {
                    path: self.path.to_path_buf(),
                    digest: layer.digest.clone(),
                });
            }
        }
        blobs.push(manifest_digest.clone());
        blobs.push(manifest.config.digest.clone());
        blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        Ok(StoredImage {
            repo_digest: None,
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            config,
            manifest,
            blobs,
        })
    }
}

/// A full reference from an index entry's annotations: containerd's image name, or an OCI ref
/// name that is a whole reference (a bare tag like `latest` names no repository).
fn names_from_annotations(desc: &Descriptor) -> Option<Reference> {
    if let Some(name) = desc.annotations.get("io.containerd.image.name") {
        if let Ok(r) = name.parse() {
            return Some(r);
        }
    }
    let name = desc.annotations.get("org.opencontainers.image.ref.name")?;
    if name.contains('/') {
        name.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths() {
        assert_eq!(normalise(b"./blobs//sha256/ab"), "blobs/sha256/ab");
        assert_eq!(
            resolve_relative("a/layer.tar", "../b/layer.tar"),
            "b/layer.tar"
        );
        assert_eq!(resolve_relative("a/layer.tar", "/x/y"), "x/y");
    }
}
