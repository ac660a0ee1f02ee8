//! `boxlite snapshot create|ls|restore|rm`, `boxlite clone` and `boxlite system df`: snapshots
//! and clones of stopped Boxes, and where the home folder's space goes.

use anyhow::Context;
use boxlite::runtime::usage::SystemUsage;
use boxlite::runtime::Runtime;
use clap::Subcommand;

use crate::table::Table;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshots of a stopped Box's disk.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotSubcommand,
    },
    /// Create a new Box (not started) with a stopped Box's configuration and disk contents.
    Clone {
        #[arg(value_name = "BOX")]
        source: String,
        #[arg(value_name = "NEWNAME")]
        name: String,
    },
    /// System-wide information.
    System {
        #[command(subcommand)]
        command: SystemSubcommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotSubcommand {
    /// Take a snapshot of a stopped Box's disk.
    Create {
        #[arg(value_name = "BOX")]
        name: String,
        snapshot: String,
    },
    /// List a Box's snapshots, oldest first.
    Ls {
        #[arg(value_name = "BOX")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Return a stopped Box's disk to a snapshot (later writes are lost).
    Restore {
        #[arg(value_name = "BOX")]
        name: String,
        snapshot: String,
    },
    /// Delete a snapshot of a stopped Box.
    Rm {
        #[arg(value_name = "BOX")]
        name: String,
        snapshot: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SystemSubcommand {
    /// Disk usage of images, Boxes and volumes.
    Df {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<u8> {
    let rt = Runtime::from_env()?;
    match cmd {
        SnapshotCommand::Snapshot { command } => snapshot(&rt, command),
        SnapshotCommand::Clone { source, name } => {
            let clone = rt
                .get(&source)?
                .clone_as(&name)
                .with_context(|| format!("cloning box {source} as {name}"))?;
            outln!("{}", clone.id());
            Ok(0)
        }
        SnapshotCommand::System {
            command: SystemSubcommand::Df { json },
        } => {
            let usage = rt.disk_usage().context("measuring disk usage")?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&usage)?);
            } else {
                print_usage(&usage);
            }
            Ok(0)
        }
    }
}

fn snapshot(rt: &Runtime, command: SnapshotSubcommand) -> anyhow::Result<u8> {
    match command {
        SnapshotSubcommand::Create { name, snapshot } => {
            rt.get(&name)?.snapshot_create(&snapshot)?;
            outln!("{snapshot}");
        }
        SnapshotSubcommand::Ls { name, json } => {
            let list = rt.get(&name)?.snapshots()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&["ID", "NAME", "CREATED"]);
                for s in &list {
                    table.row([s.id.to_string(), s.name.clone(), utc(s.created_at)]);
                }
                table.print();
            }
        }
        SnapshotSubcommand::Restore { name, snapshot } => {
            rt.get(&name)?.snapshot_restore(&snapshot)?;
            outln!("{snapshot}");
        }
        SnapshotSubcommand::Rm { name, snapshot } => {
            rt.get(&name)?.snapshot_delete(&snapshot)?;
            outln!("{snapshot}");
        }
    }
    Ok(0)
}

fn print_usage(u: &SystemUsage) {
    let boxes: u64 = u.boxes.iter().map(|b| b.disk_bytes).sum();
    let volumes: u64 = u.volumes.iter().map(|v| v.bytes).sum();
    let mut table = Table::new(&["TYPE", "COUNT", "SIZE"]).right(1).right(2);
    let mut row = |kind: &str, count: usize, bytes: u64| {
        table.row([kind.to_string(), count.to_string(), human(bytes)]);
    };
    row("Image blobs", u.images.count, u.images.blobs_bytes);
    row(
        "Image layers (extracted)",
        u.images.count,
        u.images.layers_bytes,
    );
    row("Base disks", u.images.base_disks, u.images.base_disks_bytes);
    row("Box disks", u.boxes.len(), boxes);
    row(
        "Shared clone layers",
        u.shared_layers,
        u.shared_layers_bytes,
    );
    row("Volumes", u.volumes.len(), volumes);
    table.print();
    outln!(
        "Total {}, reclaimable by `image prune` {}",
        human(u.total_bytes),
        human(u.reclaimable_bytes)
    );
    if !u.boxes.is_empty() {
        outln!();
        let mut table = Table::new(&["BOX", "STATE", "DISK", "IMAGE"]).right(2);
        for b in &u.boxes {
            table.row([
                b.name.clone(),
                b.state.to_string(),
                human(b.disk_bytes),
                b.image.clone(),
            ]);
        }
        table.print();
    }
    if !u.volumes.is_empty() {
        outln!();
        let mut table = Table::new(&["VOLUME", "SIZE"]).right(1);
        for v in &u.volumes {
            table.row([v.name.clone(), human(v.bytes)]);
        }
        table.print();
    }
}

/// Binary units, as `du -h` prints them.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for seconds since the epoch.
pub(crate) fn utc(secs: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    // RFC 3339 is `YYYY-MM-DDTHH:MM:SSZ`; tables read better with a space and no zone letter.
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replacen('T', " ", 1)
        .trim_end_matches('Z')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes_print_like_the_usual_tools() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_300_000), "2026-12-03 12:13:20");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
