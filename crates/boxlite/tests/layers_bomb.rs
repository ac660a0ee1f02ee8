//! Case 15 (layer half): a 1 MB gzip layer that expands to 1 GiB must be refused at a 64 MiB
//! limit with an error naming the layer digest and the limit, without the memory or disk the
//! expansion would take; a layer whose diff_id does not match the config must be refused with
//! both values shown. Nothing may be committed to the cache in either case.
//! (Its own test binary, so the peak RSS measured is this case's.)

mod support;

use std::fs;

use boxlite::images::archive::{Compression, LayerStream};
use boxlite::images::storage::{Limits, StorageError};
use support::{read_layout, run_case, Cache};

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage only writes the struct we pass, which is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a properly sized rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    usage.ru_maxrss
}

fn assert_nothing_committed(cache: &Cache) {
    assert_eq!(
        fs::read_dir(cache.home.layers_dir()).unwrap().count(),
        0,
        "a layer was committed"
    );
    assert_eq!(
        fs::read_dir(cache.home.tmp_dir()).unwrap().count(),
        0,
        "staging left behind"
    );
}

#[test]
fn case15_gzip_bomb_and_wrong_diff_id() {
    let gen = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let expected = run_case("15", gen.path(), &["1024"]);
    eprintln!("generator: {:?}", t.elapsed());
    let limits = Limits {
        max_uncompressed_bytes: 64 << 20,
        ..Limits::default()
    };

    // The bomb.
    let bomb = read_layout(&gen.path().join("bomb"), None);
    let layer_digest = expected["bomb"]["layer_digest"].as_str().unwrap();
    assert_eq!(bomb.layers[0].2.to_string(), layer_digest);
    let cache = Cache::new();
    let before = peak_rss_kib();
    let err = cache
        .add_image(&bomb, &limits)
        .expect_err("the bomb must be refused");
    let after = peak_rss_kib();
    eprintln!("bomb refused after {:?}, peak RSS {after} KiB", t.elapsed());
    let msg = err.to_string();
    // Refused before decompressing it: the member's declared size is past the limit.
    assert!(matches!(err, StorageError::TooLarge { .. }), "{msg}");
    assert!(msg.contains("zeros.bin"), "{msg}");
    assert!(
        msg.contains(layer_digest),
        "error must name the layer digest: {msg}"
    );
    assert!(
        msg.contains(&(64u64 << 20).to_string()) && msg.contains("64 MiB"),
        "error must name the limit: {msg}"
    );
    assert!(
        after < 200 * 1024,
        "peak RSS {after} KiB (before {before} KiB): the layer was buffered"
    );
    assert_nothing_committed(&cache);
    let diff_id: boxlite::images::digest::DiffId = expected["bomb"]["diff_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(!cache.storage.has_layer(&diff_id));

    // The stream itself stops at the limit too (a bomb hiding in what no member declares).
    let (path, _, digest) = &bomb.layers[0];
    let blob = fs::File::open(path).unwrap();
    let mut stream = LayerStream::open(blob, Compression::Gzip, digest.clone(), 64 << 20).unwrap();
    assert!(stream.drain().is_err());
    let err = stream.limit_error().expect("the limit was hit").to_string();
    assert!(
        err.contains(layer_digest) && err.contains("64 MiB"),
        "{err}"
    );
    let after = peak_rss_kib();
    assert!(
        after < 200 * 1024,
        "peak RSS {after} KiB: the stream was buffered"
    );

    // The honest layer with a lying config.
    let bad = read_layout(&gen.path().join("baddiff"), None);
    let cache = Cache::new();
    let err = cache
        .add_image(&bad, &limits)
        .expect_err("a wrong diff_id must be refused");
    let msg = err.to_string();
    let truth = expected["baddiff"]["true_diff_id"].as_str().unwrap();
    let claimed = expected["baddiff"]["config_diff_id"].as_str().unwrap();
    assert!(matches!(err, StorageError::DiffIdMismatch { .. }), "{msg}");
    assert!(
        msg.contains(truth) && msg.contains(claimed),
        "error must show both diff_ids: {msg}"
    );
    assert!(
        msg.contains(expected["baddiff"]["layer_digest"].as_str().unwrap()),
        "{msg}"
    );
    assert_nothing_committed(&cache);
    for d in [truth, claimed] {
        assert!(!cache.storage.has_layer(&d.parse().unwrap()));
    }
}
