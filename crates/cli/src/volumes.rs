//! `boxlite volume …`: named volumes and their snapshots, over `boxlite::volumes::Volumes`.

use anyhow::Context;
use boxlite::home::Home;
use boxlite::rootfs::size::{format_size, parse_size};
use boxlite::runtime::record::release_stale_leases;
use boxlite::state::Db;
use boxlite::volumes::{Volume, Volumes};
use clap::{Args, Subcommand};

use crate::table::Table;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (a thin qcow2 disk, formatted ext4 on first use in a Box).
    Create {
        name: String,
        /// Virtual size, e.g. 512M, 10G (default 10G, or the backing volume's size).
        #[arg(long)]
        size: Option<String>,
        /// Build the volume on another one (which then becomes read-only).
        #[arg(long)]
        backing: Option<String>,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume (refused while a Box uses it or a volume is built on it).
    #[command(alias = "remove")]
    Rm { name: String },
    /// Take a snapshot of a volume: `volume snapshot NAME SNAP`; or `volume snapshot rm NAME SNAP`.
    Snapshot(SnapshotArgs),
    /// List the snapshots of a volume.
    Snapshots {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Return a volume to a snapshot (later writes are lost).
    Revert { name: String, snapshot: String },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    /// The volume.
    name: Option<String>,
    /// The snapshot's name.
    snapshot: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Delete a snapshot of a volume.
    Rm { name: String, snapshot: String },
}

/// The volume store, after releasing the leases of Boxes that are gone (a killed shim), so
/// `ls` shows the true holders and `rm`, `snapshot` and `revert` are not refused for them.
fn volumes() -> anyhow::Result<Volumes> {
    let home = Home::from_env().context("open the boxlite home folder")?;
    let db = Db::open(&home).context("open the state database")?;
    release_stale_leases(&db, &home).context("release the volume leases of stopped boxes")?;
    Ok(Volumes::open(&home)?)
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<u8> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            backing,
        } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let volume = volumes()?.create(&name, size, backing.as_deref())?;
            outln!("{}", volume.name);
        }
        VolumeCommand::Ls { json } => {
            let list = volumes()?.list()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&["NAME", "SIZE", "USED", "BACKING", "IN USE BY"])
                    .right(1)
                    .right(2);
                for v in list {
                    let users = in_use_by(&v);
                    table.row([
                        v.name.clone(),
                        format_size(v.size),
                        human(v.allocated),
                        v.backing.clone().unwrap_or_else(|| "-".into()),
                        if users.is_empty() { "-".into() } else { users },
                    ]);
                }
                table.print();
            }
        }
        VolumeCommand::Rm { name } => {
            volumes()?.remove(&name)?;
            outln!("{name}");
        }
        VolumeCommand::Snapshot(args) => match (args.command, args.name, args.snapshot) {
            (Some(SnapshotCommand::Rm { name, snapshot }), _, _) => {
                volumes()?.snapshot_remove(&name, &snapshot)?;
                outln!("{snapshot}");
            }
            (None, Some(name), Some(snapshot)) => {
                volumes()?.snapshot(&name, &snapshot)?;
                outln!("{snapshot}");
            }
            _ => anyhow::bail!(
                "usage: boxlite volume snapshot NAME SNAP | volume snapshot rm NAME SNAP"
            ),
        },
        VolumeCommand::Snapshots { name, json } => {
            let snaps = volumes()?.snapshots(&name)?;
            if json {
                let list: Vec<_> = snaps
                    .iter()
                    .map(|s| serde_json::json!({"name": s.name, "created_at": s.date_sec}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&["NAME", "CREATED"]);
                for s in snaps {
                    table.row([s.name.clone(), crate::snapshots::utc(s.date_sec)]);
                }
                table.print();
            }
        }
        VolumeCommand::Revert { name, snapshot } => {
            volumes()?.revert(&name, &snapshot)?;
            outln!("{name}");
        }
    }
    Ok(0)
}

/// The Boxes that attach a volume, by name: `web(running,rw),batch(ro)`.
fn in_use_by(volume: &Volume) -> String {
    volume
        .used_by
        .iter()
        .map(|u| {
            let mode = if u.read_write { "rw" } else { "ro" };
            if u.running {
                format!("{}(running,{mode})", u.box_name)
            } else {
                format!("{}({mode})", u.box_name)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Bytes for people: `1.5M`, `320K`, `12G`.
fn human(bytes: u64) -> String {
    let units = [
        (1u64 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (scale, unit) in units {
        if bytes >= scale {
            return format!("{:.1}{unit}", bytes as f64 / scale as f64);
        }
    }
    format!("{bytes}B")
}
