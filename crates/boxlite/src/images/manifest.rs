//! The JSON documents of an image: indexes, manifests and the image config, in both the OCI image
//! spec v1.1 shapes and Docker's image manifest v2 schema 2 shapes (which differ only in media
//! types). Unknown fields are ignored so newer documents keep parsing; only what boxlite uses is
//! modelled.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::images::digest::{DiffId, Digest};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Every manifest and index type boxlite understands, for the `Accept` header.
pub const ACCEPT_MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// A pointer to content (OCI descriptor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Foreign / non-distributable layers: where the publisher says the bytes live. Never
    /// followed (they are arbitrary hosts); the layer is fetched from the registry by digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform an index entry is built for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`, e.g. `linux/amd64`, `linux/arm64/v8`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let architecture = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().map(str::to_string);
        if parts.next().is_some() {
            return None;
        }
        Some(Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant,
        })
    }

    /// The platform boxlite's guests run.
    pub fn default_guest() -> Platform {
        Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }
    }

    /// Whether an index entry for `other` can serve a request for `self` (a request without a
    /// variant accepts any variant).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The image config blob: what to run and the layer chain's uncompressed digests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<DiffId>,
}

/// How a container of the image runs (the config's `config` object), Docker's field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// What a manifest endpoint returned, told apart by media type (header, then body field).
#[derive(Debug, Clone)]
pub enum ManifestKind {
    Index(Index),
    Manifest(Manifest),
}

/// A document that is neither a manifest nor an index boxlite understands.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("unsupported manifest media type {media_type:?}")]
    Unsupported { media_type: String },
    #[error("malformed {what}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ManifestKind {
    /// Parses a manifest body; `content_type` is the server's `Content-Type`, if any.
    pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<ManifestKind, ManifestError> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            #[serde(rename = "schemaVersion")]
            schema_version: Option<u32>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(body).map_err(|source| ManifestError::Malformed {
                what: "manifest",
                source,
            })?;
        let media_type = probe
            .media_type
            .or_else(|| {
                content_type
                    .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
                    .filter(|c| ACCEPT_MANIFESTS.contains(&c.as_str()))
            })
            .unwrap_or_else(|| {
                // OCI allows omitting mediaType; the shape tells.
                if probe.manifests.is_some() {
                    OCI_INDEX.to_string()
                } else {
                    OCI_MANIFEST.to_string()
                }
            });
        if probe.schema_version != Some(2) {
            return Err(ManifestError::Unsupported {
                media_type: format!(
                    "{media_type} (schemaVersion {:?}; only 2 is supported)",
                    probe.schema_version
                ),
            });
        }
        match media_type.as_str() {
            OCI_INDEX | DOCKER_LIST => serde_json::from_slice(body)
                .map(ManifestKind::Index)
                .map_err(|source| ManifestError::Malformed {
                    what: "image index",
                    source,
                }),
            OCI_MANIFEST | DOCKER_MANIFEST => serde_json::from_slice(body)
                .map(ManifestKind::Manifest)
                .map_err(|source| ManifestError::Malformed {
                    what: "image manifest",
                    source,
                }),
            _ => Err(ManifestError::Unsupported { media_type }),
        }
    }
}

impl Index {
    /// The entry for `platform`, if the index has one.
    pub fn select(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform.as_ref().is_some_and(|p| platform.matches(p))
                && matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | "")
        })
    }

    /// The platforms on offer, for an error message.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_kinds_apart() {
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            ManifestKind::parse(idx, None).unwrap(),
            ManifestKind::Index(_)
        ));
        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(ManifestKind::parse(v1, None).is_err());
        let foreign = br#"{"schemaVersion":2,"mediaType":"text/plain"}"#;
        assert!(ManifestKind::parse(foreign, None)
            .unwrap_err()
            .to_string()
            .contains("text/plain"));
    }

    #[test]
    fn platform_selection() {
        let want = Platform::parse("linux/arm64").unwrap();
        let have = Platform::parse("linux/arm64/v8").unwrap();
        assert!(want.matches(&have));
        assert!(!have.matches(&Platform::parse("linux/arm64").unwrap()));
        assert!(Platform::parse("linux").is_none());
    }
}
