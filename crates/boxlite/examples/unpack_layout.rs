//! Unpacks an image from an OCI image layout directory with boxlite's layer cache and
//! assembly, timing each phase. Used by `bench/unpack.sh`; handy for poking at a layout by hand.
//!
//! ```text
//! cargo run --release --example unpack_layout -- LAYOUT TAG DEST [--home DIR] [--mode copy|link]
//! ```
//! Prints one line per phase: `extract <seconds>` and `assemble <seconds>`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use boxlite::home::Home;
use boxlite::images::assemble::{assemble, AssembleMode};
use boxlite::images::digest::{DiffId, Digest};
use boxlite::images::storage::{ImageStorage, LayerBlob, Limits};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: unpack_layout LAYOUT TAG DEST [--home DIR] [--mode copy|link]";
    let [layout, tag, dest, rest @ ..] = args.as_slice() else {
        return Err(usage.into());
    };
    let mut home = PathBuf::from(dest).with_extension("home");
    let mut mode = AssembleMode::Copy;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--home", Some(h)) => home = h.into(),
            ("--mode", Some(m)) if m == "link" => mode = AssembleMode::Link,
            ("--mode", Some(m)) if m == "copy" => mode = AssembleMode::Copy,
            _ => return Err(usage.into()),
        }
    }

    let (layers, diff_ids) = read_layout(Path::new(layout), tag)?;
    let home = Home::open(home)?;
    let storage = ImageStorage::new(&home);

    let started = Instant::now();
    for ((path, media_type, digest), diff_id) in layers.iter().zip(&diff_ids) {
        let blob = LayerBlob {
            path,
            media_type,
            digest,
        };
        storage.ensure_layer(&blob, diff_id, &Limits::default())?;
    }
    println!("extract {:.3}", started.elapsed().as_secs_f64());

    let started = Instant::now();
    assemble(&storage, &diff_ids, Path::new(dest), mode)?;
    println!("assemble {:.3}", started.elapsed().as_secs_f64());
    Ok(())
}

type Layers = Vec<(PathBuf, String, Digest)>;

/// The layers (blob, media type, digest) and diff_ids of the image tagged `tag`.
fn read_layout(dir: &Path, tag: &str) -> Result<(Layers, Vec<DiffId>), Box<dyn std::error::Error>> {
    let json = |p: PathBuf| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        Ok(serde_json::from_slice(&std::fs::read(p)?)?)
    };
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = json(dir.join("index.json"))?;
    let desc = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .ok_or("tag not in index.json")?;
    let manifest = json(blob(desc["digest"].as_str().ok_or("bad index")?))?;
    let config = json(blob(
        manifest["config"]["digest"]
            .as_str()
            .ok_or("bad manifest")?,
    ))?;
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().ok_or("bad manifest")? {
        let d = l["digest"].as_str().ok_or("bad layer")?;
        layers.push((
            blob(d),
            l["mediaType"].as_str().unwrap_or_default().to_string(),
            d.parse()?,
        ));
    }
    let mut diff_ids = Vec::new();
    for d in config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("bad config")?
    {
        diff_ids.push(d.as_str().ok_or("bad config")?.parse()?);
    }
    Ok((layers, diff_ids))
}
