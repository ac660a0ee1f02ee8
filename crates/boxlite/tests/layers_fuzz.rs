//! Mutated layer tars (bytes flipped in headers with the checksum fixed up so the damage gets
//! past it, truncations, junk) must never panic the extractor and never touch anything outside
//! the destination, whatever they decode to.

mod support;

use std::fs;
use std::path::Path;

use boxlite::images::layer::{extract_layer, ExtractOptions};
use support::{dir, file, hardlink, symlink, tar_bytes, Member};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut long = file(
        &format!("{}/{}", "d".repeat(120), "f".repeat(120)),
        b"long\n",
        0o644,
    );
    long.pax.push(("SCHILY.xattr.user.a".into(), b"b".to_vec()));
    let dev = Member {
        name: "dev/null".into(),
        kind: b'3',
        mode: 0o666,
        dev: (1, 3),
        ..Member::default()
    };
    vec![
        tar_bytes(&[
            dir("a", 0o755),
            file("a/f", b"hello\n", 0o644),
            hardlink("a/h", "a/f"),
            symlink("a/s", "../etc/passwd"),
            file("a/.wh.gone", b"", 0o644),
            file("b/.wh..wh..opq", b"", 0o644),
            dev,
            long,
        ]),
        tar_bytes(&[
            file("x", &vec![7u8; 3000], 0o4755),
            dir("y", 0o555),
            file("y/z", b"z", 0o444),
        ]),
    ]
}

fn fix_checksum(block: &mut [u8]) {
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    block[148..156].copy_from_slice(text.as_bytes());
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    match rng.below(4) {
        0 | 1 => {
            let blocks = out.len() / 512;
            for _ in 0..1 + rng.below(4) {
                let b = rng.below(blocks);
                let i = b * 512 + rng.below(512);
                out[i] = match rng.below(4) {
                    0 => 0,
                    1 => b'/',
                    2 => b'.',
                    _ => rng.next() as u8,
                };
                if rng.below(4) != 0 {
                    fix_checksum(&mut out[b * 512..b * 512 + 512]);
                }
            }
        }
        2 => out.truncate(rng.below(out.len())),
        _ => {
            let at = rng.below(out.len());
            let junk: Vec<u8> = (0..rng.below(700)).map(|_| rng.next() as u8).collect();
            out.splice(at..at, junk);
        }
    }
    out
}

fn only_child(parent: &Path, name: &str) {
    let names: Vec<_> = fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [name],
        "something was written beside the destination"
    );
}

#[test]
fn mutated_tars_never_panic_or_escape() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = seeds();
    let sandbox = tempfile::tempdir().unwrap();
    let (mut ok, mut refused) = (0, 0);
    let rounds: usize = std::env::var("BOXLITE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for round in 0..rounds {
        let tar = mutate(&mut rng, &seeds[round % seeds.len()]);
        let dest = sandbox.path().join("dest");
        fs::create_dir(&dest).unwrap();
        match extract_layer(&tar[..], &dest, &ExtractOptions::default()) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
        only_child(sandbox.path(), "dest");
        let status = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert!(
        ok > 0 && refused > 0,
        "mutations should both pass and fail: {ok} ok, {refused} refused"
    );
}
