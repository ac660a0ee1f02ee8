//! Layer blobs in every compression and media type a manifest may name, through
//! `ImageStorage::ensure_layer`: the diff_id is checked on the uncompressed stream whatever
//! the compression, gzip bytes under a plain-tar media type (docker save) are sniffed, and an
//! unknown media type is refused by name.

mod support;

use std::fs;
use std::io::Write;

use boxlite::images::assemble::AssembleMode;
use boxlite::images::digest::Digest;
use boxlite::images::storage::{LayerBlob, Limits, StorageError};
use support::{file, tar_bytes, Cache};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[test]
fn compressions_and_media_types() {
    let tar = tar_bytes(&[file("hello.txt", b"hello\n", 0o644)]);
    let diff_id = Digest::of(&tar);
    let half = tar.len() / 2;
    let multi_member = [gzip(&tar[..half]), gzip(&tar[half..])].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("application/vnd.oci.image.layer.v1.tar", tar.clone()),
        ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(&tar)),
        ("application/vnd.oci.image.layer.v1.tar+gzip", multi_member),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            zstd::encode_all(&tar[..], 3).unwrap(),
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            gzip(&tar),
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            gzip(&tar),
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            gzip(&tar),
        ),
        // docker save: gzip bytes, plain tar type
        ("application/vnd.oci.image.layer.v1.tar", gzip(&tar)),
        (
            "application/vnd.docker.image.rootfs.diff.tar",
            zstd::encode_all(&tar[..], 3).unwrap(),
        ),
    ];
    for (media_type, blob) in cases {
        let cache = Cache::new();
        let path = cache.tmp.path().join("blob");
        fs::write(&path, &blob).unwrap();
        let digest = Digest::of(&blob);
        let info = cache
            .storage
            .ensure_layer(
                &LayerBlob {
                    path: &path,
                    media_type,
                    digest: &digest,
                },
                &diff_id,
                &Limits::default(),
            )
            .unwrap_or_else(|e| panic!("{media_type}: {e}"));
        assert!(info.extracted);
        assert_eq!(info.uncompressed_bytes, Some(tar.len() as u64));
        let (root, r) = cache.assemble(std::slice::from_ref(&diff_id), AssembleMode::Copy);
        r.unwrap();
        assert_eq!(
            fs::read_to_string(root.join("hello.txt")).unwrap(),
            "hello\n",
            "{media_type}"
        );
    }

    let cache = Cache::new();
    let path = cache.tmp.path().join("blob");
    fs::write(&path, &tar).unwrap();
    let err = cache
        .storage
        .ensure_layer(
            &LayerBlob {
                path: &path,
                media_type: "application/vnd.example.weird",
                digest: &diff_id,
            },
            &diff_id,
            &Limits::default(),
        )
        .unwrap_err();
    assert!(matches!(err, StorageError::Archive(_)));
    assert!(
        err.to_string().contains("application/vnd.example.weird"),
        "{err}"
    );
    assert_eq!(fs::read_dir(cache.home.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn entry_count_limit() {
    let members: Vec<_> = (0..50)
        .map(|i| file(&format!("f{i}"), b"", 0o644))
        .collect();
    let tar = tar_bytes(&members);
    let cache = Cache::new();
    let path = cache.tmp.path().join("blob");
    fs::write(&path, &tar).unwrap();
    let digest = Digest::of(&tar);
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let err = cache
        .storage
        .ensure_layer(
            &LayerBlob {
                path: &path,
                media_type: support::TAR,
                digest: &digest,
            },
            &digest,
            &limits,
        )
        .unwrap_err();
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    assert!(msg.contains("more than 10 members"), "{msg}");
    assert_eq!(fs::read_dir(cache.home.layers_dir()).unwrap().count(), 0);
}

#[test]
fn empty_layers() {
    // The well-known empty gzip layer (1024 zero bytes) and a zero-byte tar.
    for (media_type, raw) in [
        (support::TAR_GZIP, vec![0u8; 1024]),
        (support::TAR, Vec::new()),
    ] {
        let blob = if media_type == support::TAR_GZIP {
            gzip(&raw)
        } else {
            raw.clone()
        };
        let cache = Cache::new();
        let path = cache.tmp.path().join("blob");
        fs::write(&path, &blob).unwrap();
        let diff_id = Digest::of(&raw);
        let digest = Digest::of(&blob);
        cache
            .storage
            .ensure_layer(
                &LayerBlob {
                    path: &path,
                    media_type,
                    digest: &digest,
                },
                &diff_id,
                &Limits::default(),
            )
            .unwrap_or_else(|e| panic!("{media_type}: {e}"));
        let (root, r) = cache.assemble(std::slice::from_ref(&diff_id), AssembleMode::Link);
        r.unwrap();
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    }
}

#[test]
fn names_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let latin1 = b"caf\xe9".to_vec();
    let mut f = file("x", b"latin-1 name\n", 0o644);
    f.name = [b"dir/".as_slice(), &latin1].concat();
    let mut keep = file("y", b"keep\n", 0o644);
    keep.name = [b"dir/keep-".as_slice(), &latin1].concat();
    let cache = Cache::new();
    let lower = cache.add_bytes(&tar_bytes(&[f, keep])).unwrap();
    let mut wh = file("w", b"", 0o644);
    wh.name = [b"dir/.wh.".as_slice(), &latin1].concat();
    let upper = cache.add_bytes(&tar_bytes(&[wh])).unwrap();
    let (root, r) = cache.assemble(&[lower.diff_id, upper.diff_id], AssembleMode::Copy);
    r.unwrap();
    let names: Vec<Vec<u8>> = fs::read_dir(root.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(names, [[b"keep-".as_slice(), &latin1].concat()]);
}

#[test]
fn progress_is_reported() {
    use std::sync::Mutex;
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let tar = tar_bytes(&[file("big.bin", &big, 0o644)]);
    let blob = gzip(&tar);
    let cache = Cache::new();
    let path = cache.tmp.path().join("blob");
    fs::write(&path, &blob).unwrap();
    let (digest, diff_id) = (Digest::of(&blob), Digest::of(&tar));
    let seen = Mutex::new(Vec::new());
    cache
        .storage
        .ensure_layer_with_progress(
            &LayerBlob {
                path: &path,
                media_type: support::TAR_GZIP,
                digest: &digest,
            },
            &diff_id,
            &Limits::default(),
            &|p| seen.lock().unwrap().push(p),
        )
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen
        .windows(2)
        .all(|w| w[0].uncompressed <= w[1].uncompressed && w[0].blob_read <= w[1].blob_read));
    let last = seen.last().unwrap();
    assert_eq!(
        (last.blob_read, last.blob_bytes, last.uncompressed),
        (blob.len() as u64, blob.len() as u64, tar.len() as u64)
    );
}

#[test]
fn link_mode_copies_across_filesystems() {
    use std::os::unix::fs::MetadataExt;
    let shm = std::path::Path::new("/dev/shm");
    let cache = Cache::new();
    if !shm.is_dir()
        || fs::metadata(shm).unwrap().dev() == fs::metadata(cache.tmp.path()).unwrap().dev()
    {
        panic!("needs /dev/shm on a filesystem other than the temporary directory's");
    }
    let info = cache
        .add_bytes(&tar_bytes(&[
            file("a", b"a\n", 0o640),
            support::hardlink("b", "a"),
        ]))
        .unwrap();
    let dest_parent = tempfile::tempdir_in(shm).unwrap();
    let dest = dest_parent.path().join("rootfs");
    let stats = boxlite::images::assemble::assemble(
        &cache.storage,
        &[info.diff_id],
        &dest,
        AssembleMode::Link,
    )
    .unwrap();
    assert_eq!(stats.link_fallbacks, 2);
    assert_eq!(
        (stats.files_linked, stats.files_copied, stats.hardlinks),
        (0, 1, 1)
    );
    assert_eq!(fs::read_to_string(dest.join("b")).unwrap(), "a\n");
    assert_eq!(
        fs::metadata(dest.join("a")).unwrap().ino(),
        fs::metadata(dest.join("b")).unwrap().ino()
    );
    assert_eq!(fs::metadata(dest.join("a")).unwrap().mode() & 0o7777, 0o640);
}
