//! The disk benchmark behind `bench/disks.sh` (ignored in normal test runs): base disk builds
//! against `mke2fs -d` alone and `mkfs.erofs`, Box disk creation, snapshots, clones and bytes
//! per Box. Trees come from `BENCH_TREES` (`name=path,name=path`). Prints a markdown table.

mod disk_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use boxlite::home::Home;
use boxlite::rootfs::base::{self, measure_tree, plan_size};
use boxlite::rootfs::{BoxDisk, ImageFormat};
use disk_support::*;

const RUNS: usize = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn trees() -> Vec<(String, PathBuf)> {
    let spec = std::env::var("BENCH_TREES").expect("BENCH_TREES=name=path,...");
    spec.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("name=path");
            (k.to_string(), PathBuf::from(v))
        })
        .collect()
}

fn bench_tree(name: &str, tree: &Path, scratch: &Path) {
    let usage = measure_tree(tree).unwrap();
    let mb = usage.file_bytes as f64 / (1 << 20) as f64;
    let (size, inodes) = plan_size(&usage);
    // Warm the page cache so every contender reads the tree from memory.
    run(Command::new("sh")
        .arg("-c")
        .arg("tar cf - -C \"$0\" . | cat > /dev/null")
        .arg(tree));

    // The floor: mke2fs -d alone, same size, no measuring, no fixups, no rename.
    let floor_img = scratch.join(format!("{name}-floor.raw"));
    let floor = timed(|| {
        run(Command::new("truncate")
            .arg("-s")
            .arg(size.to_string())
            .arg(&floor_img));
        run(Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-N",
                &inodes.to_string(),
                "-d",
            ])
            .arg(tree)
            .arg(&floor_img));
    });
    let _ = std::fs::remove_file(&floor_img);

    let erofs_img = scratch.join(format!("{name}.erofs"));
    let erofs = timed(|| {
        run(Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(&erofs_img)
            .arg(tree))
    });
    let erofs_size = allocated_bytes(&erofs_img);
    let _ = std::fs::remove_file(&erofs_img);

    let home = Home::open(scratch.join(format!("home-{name}"))).unwrap();
    let mut built = None;
    let build = timed(|| built = Some(base::ensure_base(&home, name, tree).unwrap()));
    let built = built.unwrap();
    let base_alloc = allocated_bytes(&built.path);

    let mut creates = Vec::new();
    for i in 0..RUNS {
        let id = format!("b{i}");
        creates.push(timed(|| {
            BoxDisk::create(&home, &id, &built.path, ImageFormat::Raw, None).unwrap();
        }));
    }
    let per_box = (0..RUNS)
        .map(|i| allocated_bytes(&home.box_dir(&format!("b{i}")).join("disk.qcow2")))
        .max()
        .unwrap();

    let disk = BoxDisk::open(&home, "b0").unwrap();
    guest_write(disk.path(), 64 << 20, 4 << 20, 0x42);
    let mut snaps = Vec::new();
    for i in 0..5 {
        snaps.push(timed(|| disk.snapshot_create(&format!("s{i}")).unwrap()));
    }
    let mut clones = Vec::new();
    for i in 1..=5 {
        let src = BoxDisk::open(&home, &format!("b{i}")).unwrap();
        guest_write(src.path(), 64 << 20, 4 << 20, 0x42);
        clones.push(timed(|| {
            src.clone_to(&home, &format!("c{i}")).unwrap();
        }));
    }

    println!(
        "| {name} | {mb:.0} MB, {} inodes | {} ms ({:.2} ms/MB) | {} ms ({:.2} ms/MB) | {} ms, {:.1} MB | {:.1} MB | {} ms | {} KiB | {} ms | {} ms |",
        usage.inodes,
        ms(build),
        build.as_secs_f64() * 1000.0 / mb.max(1.0),
        ms(floor),
        floor.as_secs_f64() * 1000.0 / mb.max(1.0),
        ms(erofs),
        erofs_size as f64 / (1 << 20) as f64,
        base_alloc as f64 / (1 << 20) as f64,
        ms(median(creates)),
        per_box / 1024,
        ms(median(snaps)),
        ms(median(clones)),
    );
}

#[test]
#[ignore = "benchmark: run bench/disks.sh"]
fn disk_bench() {
    let scratch =
        tempfile::tempdir_in(std::env::var("BENCH_SCRATCH").unwrap_or("/tmp".into())).unwrap();
    println!();
    println!("| tree | content | base build (boxlite) | mke2fs -d alone (floor) | mkfs.erofs lz4hc | base on host | box disk create (median of {RUNS}) | bytes per box after create | snapshot (median of 5) | clone (median of 5) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, tree) in trees() {
        bench_tree(&name, &tree, scratch.path());
    }
}
