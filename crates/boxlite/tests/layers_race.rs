//! Several processes extracting the same layer into one home at once: every one succeeds,
//! exactly one commits, the others throw their staging copies away, and the cache holds one
//! complete copy. (The test re-runs its own binary as the competing processes.)

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use boxlite::home::Home;
use boxlite::images::digest::Digest;
use boxlite::images::storage::{ImageStorage, LayerBlob, Limits};
use support::{file, tar_bytes};

const HOME: &str = "BOXLITE_TEST_RACE_HOME";
const TAR: &str = "BOXLITE_TEST_RACE_TAR";

#[test]
fn processes_racing_for_one_layer() {
    if let (Some(home), Some(tar)) = (std::env::var_os(HOME), std::env::var_os(TAR)) {
        return compete(home.into(), tar.into());
    }
    let tmp = tempfile::tempdir().unwrap();
    let members: Vec<_> = (0..600)
        .map(|i| file(&format!("d{}/f{i}", i % 30), &[b'x'; 700], 0o644))
        .collect();
    let tar = tar_bytes(&members);
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    let home = tmp.path().join("home");

    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "processes_racing_for_one_layer", "--nocapture"])
                .env(HOME, &home)
                .env(TAR, &tar_path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (mut committed, mut lost) = (0, 0);
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "a competitor failed:\n{text}");
        assert!(
            text.contains("1 passed"),
            "a competitor did not run:\n{text}"
        );
        if text.contains("race: committed") {
            committed += 1;
        } else if text.contains("race: lost") {
            lost += 1;
        }
    }
    assert_eq!(
        (committed, lost),
        (1, 2),
        "one process commits, the others lose the rename"
    );

    let home = Home::open(&home).unwrap();
    let storage = ImageStorage::new(&home);
    let diff_id = Digest::of(&tar);
    assert_eq!(
        storage.list_layers().unwrap(),
        std::slice::from_ref(&diff_id)
    );
    assert_eq!(
        fs::read_dir(home.tmp_dir()).unwrap().count(),
        0,
        "losers cleaned up"
    );
    assert_eq!(
        fs::read_dir(storage.layer_root(&diff_id).join("d7"))
            .unwrap()
            .count(),
        20
    );
}

fn compete(home: PathBuf, tar: PathBuf) {
    let home = Home::open(home).unwrap();
    let storage = ImageStorage::new(&home);
    let digest = Digest::of(&fs::read(&tar).unwrap());
    let blob = LayerBlob {
        path: &tar,
        media_type: support::TAR,
        digest: &digest,
    };

    // Start together: each announces itself, then waits for the other two.
    let barrier = tar.with_file_name("barrier");
    fs::create_dir_all(&barrier).unwrap();
    fs::write(barrier.join(std::process::id().to_string()), "").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fs::read_dir(&barrier).unwrap().count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the other competitors never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }

    let info = storage
        .ensure_layer(&blob, &digest, &Limits::default())
        .unwrap();
    let outcome = match (info.extracted, info.uncompressed_bytes) {
        (true, _) => "committed",
        (false, Some(_)) => "lost",
        (false, None) => "found",
    };
    println!("race: {outcome}");
}
