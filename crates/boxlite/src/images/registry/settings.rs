//! Image settings from the home config file (`config.json` in the home folder), the
//! environment and the command line.
//!
//! ```json
//! { "insecure_registries": ["registry.lan:5000"],
//!   "registry_mirrors": { "docker.io": ["http://127.0.0.1:5001"] },
//!   "limits": { "max_layer_size": 8589934592, "max_concurrent_downloads": 3 } }
//! ```
//! Unknown keys are ignored (other parts of boxlite keep their settings in the same file).
//! `BOXLITE_INSECURE_REGISTRIES` (comma separated) adds to the insecure list.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{RegistryError, Result};
use crate::home::Home;
use crate::images::reference::{host_without_port, is_loopback_host};

/// Default bound on one layer's uncompressed size (decompression bombs stop here).
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 16 << 30;
/// Default bound on a manifest, index or config document.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// The settings that shape pulls.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Registries (host or host:port) reached over plain HTTP although not on loopback.
    pub insecure_registries: Vec<String>,
    /// Per registry, endpoints (`http(s)://host[:port]`) tried before the registry itself.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Largest uncompressed layer accepted, in bytes.
    pub max_layer_size: u64,
    /// Largest manifest, index or config accepted, in bytes.
    pub max_manifest_size: u64,
    /// Layers downloaded at once.
    pub max_concurrent_downloads: usize,
}

impl Default for ImageSettings {
    fn default() -> ImageSettings {
        ImageSettings {
            insecure_registries: Vec::new(),
            mirrors: BTreeMap::new(),
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
            max_manifest_size: DEFAULT_MAX_MANIFEST_SIZE,
            max_concurrent_downloads: 3,
        }
    }
}

#[derive(Deserialize, Default)]
struct FileSettings {
    #[serde(default)]
    insecure_registries: Vec<String>,
    #[serde(default)]
    registry_mirrors: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Deserialize, Default)]
struct FileLimits {
    max_layer_size: Option<u64>,
    max_manifest_size: Option<u64>,
    max_concurrent_downloads: Option<usize>,
}

impl ImageSettings {
    /// The home's config file (if any) plus `BOXLITE_INSECURE_REGISTRIES`.
    pub fn load(home: &Home) -> Result<ImageSettings> {
        let mut settings = ImageSettings::from_file(&home.config_path())?;
        if let Ok(list) = std::env::var("BOXLITE_INSECURE_REGISTRIES") {
            settings.insecure_registries.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(settings)
    }

    fn from_file(path: &Path) -> Result<ImageSettings> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ImageSettings::default())
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    action: "reading",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let file: FileSettings =
            serde_json::from_slice(&text).map_err(|source| RegistryError::BadConfig {
                path: path.to_path_buf(),
                source,
            })?;
        let defaults = ImageSettings::default();
        Ok(ImageSettings {
            insecure_registries: file.insecure_registries,
            mirrors: file.registry_mirrors,
            max_layer_size: file
                .limits
                .max_layer_size
                .unwrap_or(defaults.max_layer_size),
            max_manifest_size: file
                .limits
                .max_manifest_size
                .unwrap_or(defaults.max_manifest_size),
            max_concurrent_downloads: file
                .limits
                .max_concurrent_downloads
                .unwrap_or(defaults.max_concurrent_downloads)
                .max(1),
        })
    }

    /// `http` for loopback and listed-insecure registries, else `https`.
    pub fn scheme_for(&self, registry: &str) -> &'static str {
        if is_loopback_host(registry) || self.is_insecure(registry) {
            "http"
        } else {
            "https"
        }
    }

    /// Whether `registry` (host or host:port) is listed insecure, by host:port or by host alone.
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure_registries.iter().any(|entry| {
            let entry = entry
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/');
            entry == registry || (!entry.contains(':') && entry == host_without_port(registry))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        let s = ImageSettings {
            insecure_registries: vec!["lan.example:5000".into(), "http://other.example".into()],
            ..ImageSettings::default()
        };
        assert_eq!(s.scheme_for("127.0.0.1:5000"), "http");
        assert_eq!(s.scheme_for("localhost"), "http");
        assert_eq!(s.scheme_for("lan.example:5000"), "http");
        assert_eq!(s.scheme_for("lan.example:5001"), "https");
        assert_eq!(s.scheme_for("other.example:1234"), "http");
        assert_eq!(s.scheme_for("docker.io"), "https");
    }

    #[test]
    fn reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"insecure_registries":["a:1"],"limits":{"max_layer_size":64},"other":{"x":1}}"#,
        )
        .unwrap();
        let s = ImageSettings::from_file(&path).unwrap();
        assert_eq!(s.insecure_registries, vec!["a:1"]);
        assert_eq!(s.max_layer_size, 64);
        std::fs::write(&path, "{").unwrap();
        let err = ImageSettings::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
