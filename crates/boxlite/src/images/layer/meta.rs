//! What an extracted layer needs besides its own files: the changes it makes to the layers
//! below it (whiteouts, opaque directories, hardlinks into them) and what extraction could not
//! apply. Stored as `layer.json` next to the layer's tree in the cache and read at assembly.
//!
//! Whiteouts are never files in the cache (OCI image spec, "Representing Changes": a whiteout
//! hides a path of a *lower* layer and is not itself content). Unknown fields are ignored and
//! missing ones default, so older and newer caches keep loading.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

use super::path::RelPath;

/// Current metadata format.
pub const META_VERSION: u32 = 1;

/// The side table of one extracted layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LayerMeta {
    pub version: u32,
    /// Paths of lower layers this layer deletes (`dir/.wh.name` becomes `dir/name`).
    pub whiteouts: BTreeSet<RelPath>,
    /// Directories whose lower-layer content this layer hides (`dir/.wh..wh..opq`).
    pub opaque_dirs: BTreeSet<RelPath>,
    /// Directories in the tree that no member declared (created as parents). Assembly merges
    /// into whatever the lower layers have there (following a lower symlink inside the root)
    /// instead of imposing the placeholder's owner and mode. The root is listed unless the
    /// layer has a `./` member.
    pub implicit_dirs: BTreeSet<RelPath>,
    /// Placeholder directories holding only whiteout markers: assembly visits them where the
    /// lower layers have them and creates nothing where they do not.
    pub marker_dirs: BTreeSet<RelPath>,
    /// Hardlinks whose target is not in this layer: link path to target path. Resolved against
    /// the assembled tree (the target lives in a lower layer).
    pub external_hardlinks: BTreeMap<RelPath, RelPath>,
    /// Device nodes that could not be created (unprivileged extraction).
    pub skipped_devices: BTreeMap<RelPath, DeviceNode>,
    /// Extended attributes that could not be set, by path.
    pub skipped_xattrs: BTreeMap<RelPath, Vec<SkippedXattr>>,
    /// Inodes whose owner could not be set (unprivileged extraction).
    pub chown_failures: u64,
    /// Members read, and bytes of file content written (logical sizes).
    pub entries: u64,
    pub content_bytes: u64,
}

/// A device node that exists in the layer but not in its cached tree.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceNode {
    /// `c` or `b`.
    pub kind: char,
    pub major: u32,
    pub minor: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    #[serde(default)]
    pub mtime: (i64, u32),
}

/// An extended attribute that extraction could not set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkippedXattr {
    /// The attribute name (`security.capability`, ...), lossy UTF-8.
    pub name: String,
    pub value_hex: String,
    pub reason: String,
}

impl LayerMeta {
    /// Forgets every record at or below `path` (a later member replaced it). Range removals:
    /// a layer may replace paths millions of times.
    pub fn forget_below(&mut self, path: &RelPath) {
        fn prune<V>(map: &mut BTreeMap<RelPath, V>, path: &RelPath) {
            map.remove(path);
            let doomed: Vec<RelPath> = map.range(path.below()).map(|(k, _)| k.clone()).collect();
            for k in doomed {
                map.remove(&k);
            }
        }
        fn prune_set(set: &mut BTreeSet<RelPath>, path: &RelPath) {
            set.remove(path);
            let doomed: Vec<RelPath> = set.range(path.below()).cloned().collect();
            for k in doomed {
                set.remove(&k);
            }
        }
        prune(&mut self.external_hardlinks, path);
        prune(&mut self.skipped_devices, path);
        prune(&mut self.skipped_xattrs, path);
        prune_set(&mut self.implicit_dirs, path);
        prune_set(&mut self.opaque_dirs, path);
    }

    /// Records xattrs that could not be set on `path`.
    pub fn record_xattr_failures(
        &mut self,
        path: &RelPath,
        failures: Vec<(std::ffi::OsString, Vec<u8>, String)>,
    ) {
        for (name, value, reason) in failures {
            tracing::warn!(
                path = %path,
                xattr = %OsStr::new(&name).to_string_lossy(),
                %reason,
                "extended attribute not applied; recorded in the layer metadata"
            );
            self.skipped_xattrs
                .entry(path.clone())
                .or_default()
                .push(SkippedXattr {
                    name: String::from_utf8_lossy(name.as_bytes()).into_owned(),
                    value_hex: hex::encode(value),
                    reason,
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_member_name(s.as_bytes()).unwrap()
    }

    #[test]
    fn forget_below_removes_exactly_the_subtree() {
        let mut meta = LayerMeta::default();
        for k in ["a", "a/b", "a/b/c", "a/bc", "a/b!x", "z"] {
            meta.implicit_dirs.insert(p(k));
            meta.external_hardlinks.insert(p(k), p("t"));
        }
        meta.forget_below(&p("a/b"));
        let left: Vec<String> = meta.implicit_dirs.iter().map(|k| k.to_string()).collect();
        assert_eq!(left, ["a", "a/b!x", "a/bc", "z"]);
        assert_eq!(meta.external_hardlinks.len(), 4);
    }

    #[test]
    fn forget_below_is_not_quadratic() {
        // A layer replacing 100k paths while holding 100k records: a scan per call would be
        // 10^10 steps; range removal is 100k lookups.
        let n = 100_000;
        let mut meta = LayerMeta::default();
        for i in 0..n {
            meta.implicit_dirs.insert(p(&format!("d{i}")));
            meta.external_hardlinks
                .insert(p(&format!("d{i}/g")), p("t"));
        }
        let started = std::time::Instant::now();
        for i in 0..n {
            meta.forget_below(&p(&format!("d{i}/f")));
        }
        assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
        assert_eq!(meta.external_hardlinks.len(), n);
    }
}
