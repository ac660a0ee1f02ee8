//! Walks a directory tree into a sorted manifest of everything a root filesystem comparison
//! cares about (type, mode, owner, content hash, symlink target, device numbers, xattrs,
//! hardlink groups, mtime), and diffs two manifests. Used to compare boxlite's unpacked
//! rootfs with reference tools (`umoci unpack`), and reusable by any test that compares trees.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// One path in a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the root, `.` for the root itself.
    pub path: String,
    /// `d` directory, `f` file, `l` symlink, `c`/`b` device, `p` FIFO, `s` socket.
    pub kind: char,
    /// Permission bits with setuid/setgid/sticky (meaningless for symlinks: 0).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: Option<String>,
    pub link_target: Option<String>,
    pub rdev: Option<(u64, u64)>,
    /// Name to hex value.
    pub xattrs: BTreeMap<String, String>,
    /// For files with more than one name inside the tree: the smallest of those names.
    pub hardlink_group: Option<String>,
    pub mtime: (i64, i64),
}

/// What [`diff`] compares besides the always-compared fields (path, kind, mode, owner,
/// content, link target, device numbers, hardlink group).
#[derive(Debug, Clone, Default)]
pub struct Compare {
    pub mtimes: bool,
    /// Compare the root directory's own attributes.
    pub root_attrs: bool,
    pub xattrs: bool,
    /// xattr name prefixes to ignore (e.g. `security.selinux`).
    pub ignore_xattr_prefixes: Vec<String>,
}

/// The manifest of the tree at `root`, sorted by path.
pub fn manifest(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    let mut inodes: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, (_, dev_ino)) in out.iter().enumerate() {
        if let Some(key) = dev_ino {
            inodes.entry(*key).or_default().push(i);
        }
    }
    let mut entries: Vec<Entry> = out.iter().map(|(e, _)| e.clone()).collect();
    for group in inodes.values().filter(|g| g.len() > 1) {
        let leader = group
            .iter()
            .map(|&i| entries[i].path.clone())
            .min()
            .unwrap();
        for &i in group {
            entries[i].hardlink_group = Some(leader.clone());
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries
}

fn walk(root: &Path, path: &Path, out: &mut Vec<(Entry, Option<(u64, u64)>)>) {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rel = match path.strip_prefix(root).unwrap() {
        p if p.as_os_str().is_empty() => ".".to_string(),
        p => String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned(),
    };
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for name in names {
            if let Ok(Some(value)) = xattr::get(path, &name) {
                xattrs.insert(name.to_string_lossy().into_owned(), hex::encode(value));
            }
        }
    }
    let sha256 = (kind == 'f').then(|| {
        let mut h = Sha256::new();
        let mut f = fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    });
    let entry = Entry {
        path: rel,
        kind,
        mode: if kind == 'l' { 0 } else { md.mode() & 0o7777 },
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == 'f' { md.size() } else { 0 },
        sha256,
        link_target: (kind == 'l').then(|| {
            String::from_utf8_lossy(fs::read_link(path).unwrap().as_os_str().as_bytes())
                .into_owned()
        }),
        rdev: matches!(kind, 'c' | 'b').then(|| {
            let rdev = md.rdev();
            (libc::major(rdev) as u64, libc::minor(rdev) as u64)
        }),
        xattrs,
        hardlink_group: None,
        mtime: (md.mtime(), md.mtime_nsec()),
    };
    let key = (kind != 'd').then(|| (md.dev(), md.ino()));
    out.push((entry, key));
    if kind == 'd' {
        let mut names: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            walk(root, &path.join(name), out);
        }
    }
}

/// Human-readable differences between two manifests (empty when they match).
pub fn diff(left: &[Entry], right: &[Entry], cmp: &Compare) -> Vec<String> {
    let l: BTreeMap<&str, &Entry> = left.iter().map(|e| (e.path.as_str(), e)).collect();
    let r: BTreeMap<&str, &Entry> = right.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut out = Vec::new();
    for (path, a) in &l {
        let Some(b) = r.get(path) else {
            out.push(format!("only in left: {path} ({})", a.kind));
            continue;
        };
        if *path == "." && !cmp.root_attrs {
            continue;
        }
        let mut field = |name: &str, x: String, y: String| {
            if x != y {
                out.push(format!("{path}: {name} differs: {x} vs {y}"));
            }
        };
        field("kind", a.kind.to_string(), b.kind.to_string());
        field("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
        field(
            "owner",
            format!("{}:{}", a.uid, a.gid),
            format!("{}:{}", b.uid, b.gid),
        );
        field(
            "content",
            format!("{:?}", a.sha256),
            format!("{:?}", b.sha256),
        );
        field(
            "link target",
            format!("{:?}", a.link_target),
            format!("{:?}", b.link_target),
        );
        field("rdev", format!("{:?}", a.rdev), format!("{:?}", b.rdev));
        field(
            "hardlink group",
            format!("{:?}", a.hardlink_group),
            format!("{:?}", b.hardlink_group),
        );
        if cmp.mtimes && a.kind != 'l' {
            field("mtime", format!("{:?}", a.mtime), format!("{:?}", b.mtime));
        }
        if cmp.xattrs {
            let keep = |x: &BTreeMap<String, String>| -> BTreeMap<String, String> {
                x.iter()
                    .filter(|(k, _)| !cmp.ignore_xattr_prefixes.iter().any(|p| k.starts_with(p)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            field(
                "xattrs",
                format!("{:?}", keep(&a.xattrs)),
                format!("{:?}", keep(&b.xattrs)),
            );
        }
    }
    for path in r.keys().filter(|p| !l.contains_key(*p)) {
        out.push(format!("only in right: {path} ({})", r[path].kind));
    }
    out
}
