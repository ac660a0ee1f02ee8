//! Named volumes: `volumes/<name>/volume.qcow2`, thin qcow2 disks that outlive Boxes, with
//! internal snapshots and optional backing volumes, recorded in the `volumes` table; which Box
//! holds which volume is in `volume_leases`.
//!
//! Rules the store enforces, each with an error naming what is in the way:
//! - a volume attached read-write to one Box cannot be attached to another (read-only attaches
//!   may share, but not with a writer);
//! - a volume that backs another is frozen: it attaches read-only only, cannot be reverted and
//!   cannot be removed until the volumes over it are gone;
//! - snapshots are taken, reverted and removed only while no Box holds the volume;
//! - a volume can be created over a backing volume only while nothing writes to that one.
//!
//! State changes run in immediate SQLite transactions, so two CLIs serialize; a crash between
//! writing files and committing leaves a folder without a row, which the next create of that
//! name clears.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use boxlite_protocol::{MountSource, MountSpec};
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::rootfs::qcow2::{self, Qcow2Error};
use crate::rootfs::qemu_img::{ImageFormat, SnapshotInfo};
use crate::state::Db;
use crate::volumes::name::{validate_volume_name, NameError};

/// Virtual size of a volume created without `--size` (thin: costs nothing until written).
pub const DEFAULT_VOLUME_SIZE: u64 = 10 << 30;
/// File name of a volume's disk inside its folder.
pub const VOLUME_FILE: &str = "volume.qcow2";

/// A failed volume operation.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("no volume named {0}")]
    NotFound(String),
    /// The volume is attached to Boxes.
    #[error("volume {name} is in use by box {boxes}")]
    InUse { name: String, boxes: String },
    /// The volume is attached read-write elsewhere, or read-only elsewhere when asking to write.
    #[error("volume {name} is attached {mode} to box {holder}; it cannot also be attached {wanted} to box {box_id}")]
    Conflict {
        name: String,
        holder: String,
        mode: &'static str,
        wanted: &'static str,
        box_id: String,
    },
    /// Other volumes are built on this one.
    #[error("volume {name} is the backing volume of {children}; {action}")]
    IsBacking {
        name: String,
        children: String,
        action: &'static str,
    },
    #[error(
        "volume {name} must be at least {minimum} bytes (the size of its backing volume {backing})"
    )]
    TooSmall {
        name: String,
        minimum: u64,
        backing: String,
    },
    #[error("volume {name}")]
    Disk {
        name: String,
        #[source]
        source: Box<Qcow2Error>,
    },
    #[error("volume state database")]
    Db(#[from] rusqlite::Error),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, VolumeError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn disk_err(name: &str) -> impl FnOnce(Qcow2Error) -> VolumeError + '_ {
    move |source| VolumeError::Disk {
        name: name.to_string(),
        source: Box::new(source),
    }
}

/// One Box's hold on a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub box_id: String,
    /// The Box's name (its id when the Box record is gone).
    pub box_name: String,
    pub read_write: bool,
}

/// A volume as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The volume this one is built on.
    pub backing: Option<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// The disk file (`volumes/<name>/volume.qcow2`).
    pub path: PathBuf,
    /// Bytes the disk file occupies on the host.
    pub allocated: u64,
    /// Boxes holding the volume now (running ones).
    pub in_use_by: Vec<Holder>,
    /// Every Box whose configuration attaches the volume, whatever its state.
    pub used_by: Vec<BoxUse>,
}

/// A Box whose configuration attaches a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoxUse {
    pub box_id: String,
    pub box_name: String,
    /// Whether the Box holds the volume now (it is running).
    pub running: bool,
    pub read_write: bool,
}

/// A Box's hold on a volume, from [`Volumes::acquire`] until [`Volumes::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub volume: String,
    pub box_id: String,
    pub read_write: bool,
    /// Attach this file to the VM as format qcow2 (never probed)…
    pub path: PathBuf,
    /// …as a virtio-blk device with this serial (at most 20 bytes, what virtio-blk keeps).
    pub serial: String,
}

impl Lease {
    /// The disk format to give QEMU.
    pub fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    /// What the guest agent mounts at `target`: ext4, formatted on first use.
    pub fn mount_spec(&self, target: &str) -> MountSpec {
        MountSpec {
            source: MountSource::Block {
                serial: self.serial.clone(),
                fstype: "ext4".to_string(),
                format_if_empty: true,
            },
            target: target.to_string(),
            readonly: !self.read_write,
            file: None,
        }
    }
}

/// The virtio-blk serial of a volume: `vol-` and 16 hex digits of the name's sha256.
pub fn volume_serial(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("vol-{}", &hex::encode(digest)[..16])
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The named volumes of one home folder.
#[derive(Debug)]
pub struct Volumes {
    home: Home,
    db: Db,
}

impl Volumes {
    /// Opens the volumes of `home` (its state database).
    pub fn open(home: &Home) -> Result<Volumes> {
        Ok(Volumes {
            home: home.clone(),
            db: Db::open(home)?,
        })
    }

    /// `volumes/<name>/volume.qcow2`.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.home.volume_dir(name).join(VOLUME_FILE)
    }

    /// Creates volume `name` of `size` bytes (default [`DEFAULT_VOLUME_SIZE`], or the backing
    /// volume's size), optionally over `backing`, which then becomes frozen (see module docs).
    pub fn create(
        &mut self,
        name: &str,
        size: Option<u64>,
        backing: Option<&str>,
    ) -> Result<Volume> {
        validate_volume_name(name)?;
        if let Some(b) = backing {
            validate_volume_name(b)?;
        }
        let dir = self.home.volume_dir(name);
        let path = self.disk_path(name);
        let backing_path = backing.map(|b| self.disk_path(b));
        let tx = self
            .db
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if row(&tx, name)?.is_some() {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let size = match backing {
            None => size.unwrap_or(DEFAULT_VOLUME_SIZE),
            Some(b) => {
                let (backing_size, _, _) =
                    row(&tx, b)?.ok_or_else(|| VolumeError::NotFound(b.to_string()))?;
                if let Some(writer) = holders(&tx, b)?.into_iter().find(|h| h.read_write) {
                    return Err(VolumeError::InUse {
                        name: b.to_string(),
                        boxes: format!("{} (read-write)", writer.box_name),
                    });
                }
                let size = size.unwrap_or(backing_size);
                if size < backing_size {
                    return Err(VolumeError::TooSmall {
                        name: name.to_string(),
                        minimum: backing_size,
                        backing: b.to_string(),
                    });
                }
                size
            }
        };

        // A folder without a row is what a crash mid-create leaves; we hold the write lock.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err("clear stale", &dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let made = match &backing_path {
            None => qcow2::create(&path, size),
            Some(b) => qcow2::create_overlay(&path, b, ImageFormat::Qcow2, Some(size)),
        };
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(disk_err(name)(e));
        }
        tx.execute(
            "INSERT INTO volumes (name, size, backing, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, size as i64, backing, now()],
        )?;
        tx.commit()?;
        tracing::info!(volume = name, size, backing, "created volume");
        self.get(name)
    }

    /// One volume.
    pub fn get(&self, name: &str) -> Result<Volume> {
        validate_volume_name(name)?;
        let conn = self.db.conn();
        let (size, backing, created_at) =
            row(conn, name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let path = self.disk_path(name);
        let allocated = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        Ok(Volume {
            name: name.to_string(),
            size,
            backing,
            created_at,
            path,
            allocated,
            used_by: users(conn, name)?,
            in_use_by: holders(conn, name)?,
        })
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>> {
        let names: Vec<String> = {
            let mut stmt = self
                .db
                .conn()
                .prepare("SELECT name FROM volumes ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        names.iter().map(|n| self.get(n)).collect()
    }

    /// Removes a volume that no Box attaches (running or not) and no volume is built on.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        validate_volume_name(name)?;
        let dir = self.home.volume_dir(name);
        let tx = self
            .db
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        row(&tx, name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        refuse_if_used(&tx, name)?;
        refuse_if_backing(&tx, name, "remove those first")?;
        tx.execute("DELETE FROM volumes WHERE name = ?1", [name])?;
        tx.commit()?;
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        tracing::info!(volume = name, "removed volume");
        Ok(())
    }

    /// Runs `op` on the disk of `name` while no Box can acquire it (the write transaction is
    /// held throughout), after checking that no Box holds it.
    fn with_idle_disk<T>(
        &mut self,
        name: &str,
        backing_check: Option<&'static str>,
        op: impl FnOnce(&Path) -> std::result::Result<T, Qcow2Error>,
    ) -> Result<T> {
        validate_volume_name(name)?;
        let path = self.disk_path(name);
        let tx = self
            .db
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        row(&tx, name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        refuse_if_held(&tx, name)?;
        if let Some(action) = backing_check {
            refuse_if_backing(&tx, name, action)?;
        }
        let out = op(&path).map_err(disk_err(name))?;
        tx.commit()?;
        Ok(out)
    }

    /// Takes snapshot `snap` of a volume no Box holds.
    pub fn snapshot(&mut self, name: &str, snap: &str) -> Result<()> {
        self.with_idle_disk(name, None, |p| qcow2::snapshot_create(p, snap))
    }

    /// The snapshots of a volume, oldest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        let volume = self.get(name)?;
        qcow2::snapshots(&volume.path).map_err(disk_err(name))
    }

    /// Returns a volume no Box holds (and that backs no volume) to snapshot `snap`.
    pub fn revert(&mut self, name: &str, snap: &str) -> Result<()> {
        self.with_idle_disk(
            name,
            Some("reverting it would change their contents"),
            |p| qcow2::snapshot_apply(p, snap),
        )
    }

    /// Deletes snapshot `snap` of a volume no Box holds.
    pub fn snapshot_remove(&mut self, name: &str, snap: &str) -> Result<()> {
        self.with_idle_disk(name, None, |p| qcow2::snapshot_delete(p, snap))
    }

    /// Records that `box_id` attaches volume `name` (read-write or read-only) and returns what
    /// the VM needs. Acquiring again for the same Box and mode returns the same lease.
    pub fn acquire(&mut self, name: &str, box_id: &str, read_write: bool) -> Result<Lease> {
        validate_volume_name(name)?;
        let tx = self
            .db
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        row(&tx, name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let mode = |rw| if rw { "read-write" } else { "read-only" };
        let current = holders(&tx, name)?;
        for h in current.clone() {
            if h.box_id == box_id && h.read_write == read_write {
                continue;
            }
            if h.box_id == box_id || h.read_write || read_write {
                return Err(VolumeError::Conflict {
                    name: name.to_string(),
                    holder: h.box_name,
                    mode: mode(h.read_write),
                    wanted: mode(read_write),
                    box_id: box_name(&tx, box_id)?,
                });
            }
        }
        if read_write {
            refuse_if_backing(&tx, name, "it can only be attached read-only")?;
        }
        // The chain must be safe to hand to QEMU; a volume nobody holds is also checked and
        // cleared of leaks a crash left (with holders, a VM has it open and it was checked).
        let path = self.home.volume_dir(name).join(VOLUME_FILE);
        if current.is_empty() {
            qcow2::check_and_repair_leaks(&path).map_err(disk_err(name))?;
        } else {
            qcow2::verify_chain(&path, ImageFormat::Qcow2).map_err(disk_err(name))?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO volume_leases (volume, box_id, read_write, acquired_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![name, box_id, read_write, now()],
        )?;
        tx.commit()?;
        Ok(Lease {
            volume: name.to_string(),
            box_id: box_id.to_string(),
            read_write,
            path,
            serial: volume_serial(name),
        })
    }

    /// Ends `box_id`'s hold on volume `name` (no-op if it holds none). The Box's VM must be
    /// gone: a read-write hold first has the leaks a crash may have left repaired (see
    /// [`repair_after_use`]), while the hold still keeps other Boxes out.
    pub fn release(&mut self, name: &str, box_id: &str) -> Result<()> {
        let read_write: Option<bool> = self
            .db
            .conn()
            .query_row(
                "SELECT read_write FROM volume_leases WHERE volume = ?1 AND box_id = ?2",
                params![name, box_id],
                |r| r.get(0),
            )
            .optional()?;
        if read_write == Some(true) {
            repair_after_use(&self.home, name);
        }
        self.db.conn().execute(
            "DELETE FROM volume_leases WHERE volume = ?1 AND box_id = ?2",
            params![name, box_id],
        )?;
        Ok(())
    }

    /// Ends the holds of every Box not in `live_boxes` (Boxes that were removed, or whose shim
    /// died without releasing). Returns the `(volume, box id)` pairs released.
    pub fn release_stale(&mut self, live_boxes: &[&str]) -> Result<Vec<(String, String)>> {
        let tx = self
            .db
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let all: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT volume, box_id FROM volume_leases")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let stale: Vec<(String, String)> = all
            .into_iter()
            .filter(|(_, b)| !live_boxes.contains(&b.as_str()))
            .collect();
        for (volume, box_id) in &stale {
            tx.execute(
                "DELETE FROM volume_leases WHERE volume = ?1 AND box_id = ?2",
                params![volume, box_id],
            )?;
            tracing::info!(volume, box_id, "released a stale volume lease");
        }
        tx.commit()?;
        Ok(stale)
    }

    /// Ends every hold of `box_id` (when the Box stops or its shim died).
    pub fn release_box(&mut self, box_id: &str) -> Result<()> {
        self.db
            .conn()
            .execute("DELETE FROM volume_leases WHERE box_id = ?1", [box_id])?;
        Ok(())
    }
}

/// After a read-write hold ends (the VM that had the volume open is gone): a VM killed between
/// allocating clusters and referencing them leaves leaked clusters (wasted space, no harm to
/// data), which `qemu-img check` reports; they are repaired here so the volume checks clean
/// however its Box ended. A failure is only logged: QEMU's image lock refuses the repair while a
/// dying VM still has the file, and the next attach checks and repairs again.
pub fn repair_after_use(home: &Home, name: &str) {
    let path = home.volume_dir(name).join(VOLUME_FILE);
    if let Err(e) = qcow2::check_and_repair_leaks(&path) {
        tracing::warn!(volume = name, error = %e, "checking the volume after its Box");
    }
}

type Row = (u64, Option<String>, i64);

fn row(conn: &rusqlite::Connection, name: &str) -> Result<Option<Row>> {
    Ok(conn
        .query_row(
            "SELECT size, backing, created_at FROM volumes WHERE name = ?1",
            [name],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

fn holders(conn: &rusqlite::Connection, name: &str) -> Result<Vec<Holder>> {
    let mut stmt = conn.prepare(
        "SELECT l.box_id, COALESCE(b.name, l.box_id), l.read_write
         FROM volume_leases l LEFT JOIN boxes b ON b.id = l.box_id
         WHERE l.volume = ?1 ORDER BY l.acquired_at, l.box_id",
    )?;
    let rows = stmt.query_map([name], |r| {
        Ok(Holder {
            box_id: r.get(0)?,
            box_name: r.get(1)?,
            read_write: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The Boxes whose configuration attaches volume `name`, whatever their state, plus Boxes that
/// hold a lease on it without such a record (oldest first).
fn users(conn: &rusqlite::Connection, name: &str) -> Result<Vec<BoxUse>> {
    /// The part of a Box's stored configuration that names its volumes.
    #[derive(serde::Deserialize)]
    struct Mounts {
        #[serde(default)]
        mounts: Vec<crate::runtime::config::MountConfig>,
    }
    let held = holders(conn, name)?;
    let mut stmt = conn.prepare("SELECT id, name, config FROM boxes ORDER BY created_at, name")?;
    let boxes: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (box_id, box_name, config) in boxes {
        let Ok(config) = serde_json::from_str::<Mounts>(&config) else {
            continue;
        };
        let attached = config.mounts.iter().find_map(|m| match m {
            crate::runtime::config::MountConfig::Volume {
                name: v, readonly, ..
            } if v == name => Some(!readonly),
            _ => None,
        });
        if let Some(read_write) = attached {
            let running = held.iter().any(|h| h.box_id == box_id);
            out.push(BoxUse {
                box_id,
                box_name,
                running,
                read_write,
            });
        }
    }
    for h in held {
        if !out.iter().any(|u| u.box_id == h.box_id) {
            out.push(BoxUse {
                box_id: h.box_id,
                box_name: h.box_name,
                running: true,
                read_write: h.read_write,
            });
        }
    }
    Ok(out)
}

/// Refuses while any Box attaches volume `name`, running or not (starting it would fail).
fn refuse_if_used(conn: &rusqlite::Connection, name: &str) -> Result<()> {
    let used = users(conn, name)?;
    refuse_for(name, used.iter().map(|u| u.box_name.as_str()))
}

/// The in-use refusal of volume `name`, naming `boxes`; none, no refusal.
fn refuse_for<'a>(name: &str, boxes: impl Iterator<Item = &'a str>) -> Result<()> {
    let boxes: Vec<&str> = boxes.collect();
    if boxes.is_empty() {
        return Ok(());
    }
    Err(VolumeError::InUse {
        name: name.to_string(),
        boxes: boxes.join(", "),
    })
}

/// The name of Box `id`, or the id itself when no Box record has it.
fn box_name(conn: &rusqlite::Connection, id: &str) -> Result<String> {
    Ok(conn
        .query_row("SELECT name FROM boxes WHERE id = ?1", [id], |r| r.get(0))
        .optional()?
        .unwrap_or_else(|| id.to_string()))
}

fn refuse_if_held(conn: &rusqlite::Connection, name: &str) -> Result<()> {
    let held = holders(conn, name)?;
    refuse_for(name, held.iter().map(|h| h.box_name.as_str()))
}

fn refuse_if_backing(conn: &rusqlite::Connection, name: &str, action: &'static str) -> Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM volumes WHERE backing = ?1 ORDER BY name")?;
    let children: Vec<String> = stmt
        .query_map([name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if children.is_empty() {
        return Ok(());
    }
    Err(VolumeError::IsBacking {
        name: name.to_string(),
        children: children.join(", "),
        action,
    })
}
