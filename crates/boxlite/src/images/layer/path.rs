//! Paths inside a layer, cleaned once at the edge.
//!
//! A tar member name is hostile input: it may be absolute, contain `..`, be longer than the
//! kernel accepts or carry a NUL. [`RelPath`] holds only what survived cleaning: a relative path
//! of plain components (no `.`, no `..`, no empty component), at most [`MAX_DEPTH`] deep, each
//! component at most 255 bytes. The empty path is the layer's root.
//!
//! Member names refuse `..` outright (no tool writes it); hardlink targets are cleaned
//! lexically, since builders do write `//usr/./bin/../bin/x`, and refused when they climb above
//! the root. An absolute target is taken relative to the layer's root, never the host's.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::ops::Bound;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Deepest path accepted, in components. Far beyond real images (node_modules peaks near 40);
/// it bounds the descriptors a tree walk holds open.
pub const MAX_DEPTH: usize = 255;

/// Longest single component (Linux `NAME_MAX`).
const NAME_MAX: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("contains a '..' component")]
    DotDot,
    #[error("climbs above the root with '..'")]
    Escapes,
    #[error("contains a NUL byte")]
    Nul,
    #[error("is deeper than {MAX_DEPTH} components")]
    TooDeep,
    #[error("has a component longer than {NAME_MAX} bytes")]
    ComponentTooLong,
    #[error("is empty")]
    Empty,
}

/// A cleaned path relative to a layer's root (see the module doc). Sorts bytewise.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath {
    /// Components joined by `/`, no leading or trailing slash.
    bytes: Vec<u8>,
}

impl RelPath {
    /// The root of the layer.
    pub fn root() -> RelPath {
        RelPath::default()
    }

    /// Cleans a tar member name: leading `/` and `./` go, `.` and empty components go, `..`
    /// is refused.
    pub fn from_member_name(name: &[u8]) -> Result<RelPath, PathProblem> {
        let mut out = RelPath::root();
        for comp in name.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err(PathProblem::DotDot),
                _ => out.push_checked(comp)?,
            }
        }
        Ok(out)
    }

    /// Cleans a hardlink target: relative to the layer root whether written absolute or not,
    /// `..` resolved lexically and refused when it would leave the root.
    pub fn from_link_target(target: &[u8]) -> Result<RelPath, PathProblem> {
        let mut parts: Vec<&[u8]> = Vec::new();
        for comp in target.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    if parts.pop().is_none() {
                        return Err(PathProblem::Escapes);
                    }
                }
                _ => parts.push(comp),
            }
        }
        let mut out = RelPath::root();
        for comp in parts {
            out.push_checked(comp)?;
        }
        if out.is_root() {
            return Err(PathProblem::Empty);
        }
        Ok(out)
    }

    fn push_checked(&mut self, comp: &[u8]) -> Result<(), PathProblem> {
        if comp.contains(&0) {
            return Err(PathProblem::Nul);
        }
        if comp.len() > NAME_MAX {
            return Err(PathProblem::ComponentTooLong);
        }
        if self.depth() >= MAX_DEPTH {
            return Err(PathProblem::TooDeep);
        }
        if !self.bytes.is_empty() {
            self.bytes.push(b'/');
        }
        self.bytes.extend_from_slice(comp);
        Ok(())
    }

    /// This path with one more component. `name` must be a single valid component (it comes
    /// from a directory listing or from another `RelPath`).
    pub fn join(&self, name: &OsStr) -> RelPath {
        let mut out = self.clone();
        debug_assert!(!name.as_bytes().contains(&b'/'));
        if !out.bytes.is_empty() {
            out.bytes.push(b'/');
        }
        out.bytes.extend_from_slice(name.as_bytes());
        out
    }

    pub fn is_root(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.bytes.is_empty() {
            0
        } else {
            self.bytes.iter().filter(|&&b| b == b'/').count() + 1
        }
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &OsStr> {
        self.bytes
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        if self.is_root() {
            return None;
        }
        match self.bytes.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((
                RelPath {
                    bytes: self.bytes[..i].to_vec(),
                },
                OsStr::from_bytes(&self.bytes[i + 1..]),
            )),
            None => Some((RelPath::root(), OsStr::from_bytes(&self.bytes))),
        }
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.split_last().map(|(_, name)| name)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.is_root()
            || self.bytes == other.bytes
            || (self.bytes.starts_with(&other.bytes)
                && self.bytes.get(other.bytes.len()) == Some(&b'/'))
    }

    /// The key range holding exactly the paths strictly below `self` (all of them start with
    /// `self/`, and bytewise order keeps them together), for range queries on sorted maps.
    pub fn below(&self) -> (Bound<RelPath>, Bound<RelPath>) {
        if self.is_root() {
            return (Bound::Excluded(RelPath::root()), Bound::Unbounded);
        }
        let mut start = self.bytes.clone();
        start.push(b'/');
        let mut end = self.bytes.clone();
        end.push(b'/' + 1);
        (
            Bound::Included(RelPath { bytes: start }),
            Bound::Excluded(RelPath { bytes: end }),
        )
    }

    /// As a relative `Path` (empty for the root).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            write!(f, "{}", String::from_utf8_lossy(&self.bytes))
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.bytes))
    }
}

/// On disk a path is a JSON string when it is UTF-8 (nearly always) and `{"hex": "..."}` when not,
/// so names in other encodings survive a round trip.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PathRepr {
    Utf8(String),
    Bytes { hex: String },
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => PathRepr::Utf8(text.to_string()),
            Err(_) => PathRepr::Bytes {
                hex: hex::encode(&self.bytes),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RelPath, D::Error> {
        let bytes = match PathRepr::deserialize(d)? {
            PathRepr::Utf8(text) => text.into_bytes(),
            PathRepr::Bytes { hex } => hex::decode(hex).map_err(serde::de::Error::custom)?,
        };
        // Metadata files are ours, but re-clean anyway: a path from disk is still a path.
        let cleaned = RelPath::from_member_name(&bytes).map_err(serde::de::Error::custom)?;
        if cleaned.bytes != bytes {
            return Err(serde::de::Error::custom(
                "layer metadata holds an unclean path",
            ));
        }
        Ok(cleaned)
    }
}

/// A `PathBuf` from raw bytes (names in tar and on Linux are bytes, not text).
pub fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(s: &str) -> Result<String, PathProblem> {
        RelPath::from_member_name(s.as_bytes()).map(|p| p.to_string())
    }

    fn target(s: &str) -> Result<String, PathProblem> {
        RelPath::from_link_target(s.as_bytes()).map(|p| p.to_string())
    }

    #[test]
    fn member_names() {
        assert_eq!(member("./usr/bin/").unwrap(), "usr/bin");
        assert_eq!(member("/etc//passwd").unwrap(), "etc/passwd");
        assert_eq!(member("./").unwrap(), "/");
        assert_eq!(member("a/../b"), Err(PathProblem::DotDot));
        assert_eq!(member("../../etc/passwd"), Err(PathProblem::DotDot));
        assert_eq!(member(&"x".repeat(256)), Err(PathProblem::ComponentTooLong));
        assert_eq!(member(&"d/".repeat(300)), Err(PathProblem::TooDeep));
        assert_eq!(RelPath::from_member_name(b"a\0b"), Err(PathProblem::Nul));
    }

    #[test]
    fn link_targets() {
        assert_eq!(target("/usr/bin/perlbug").unwrap(), "usr/bin/perlbug");
        assert_eq!(
            target("//usr/./bin/../bin/perlbug").unwrap(),
            "usr/bin/perlbug"
        );
        assert_eq!(target("/../tmp/secret"), Err(PathProblem::Escapes));
        assert_eq!(target("usr/../../etc"), Err(PathProblem::Escapes));
        assert_eq!(target("../x"), Err(PathProblem::Escapes));
        assert_eq!(target("usr/.."), Err(PathProblem::Empty));
    }

    #[test]
    fn structure() {
        let p = RelPath::from_member_name(b"a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.to_string(), "a/b");
        assert_eq!(name, "c");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&parent));
        assert!(!RelPath::from_member_name(b"a/bc")
            .unwrap()
            .starts_with(&RelPath::from_member_name(b"a/b").unwrap()));
        let mut set = std::collections::BTreeSet::new();
        for n in ["a", "a/b", "a/b!", "a/b/c", "a/b/c/d", "a/b0", "a/c"] {
            set.insert(RelPath::from_member_name(n.as_bytes()).unwrap());
        }
        let below: Vec<String> = set.range(parent.below()).map(|p| p.to_string()).collect();
        assert_eq!(below, ["a/b/c", "a/b/c/d"]);
        assert_eq!(set.range(RelPath::root().below()).count(), 7);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<RelPath>(&json).unwrap(), p);
        let latin1 = RelPath::from_member_name(b"caf\xe9").unwrap();
        let json = serde_json::to_string(&latin1).unwrap();
        assert!(json.contains("hex"), "{json}");
        assert_eq!(serde_json::from_str::<RelPath>(&json).unwrap(), latin1);
    }
}
