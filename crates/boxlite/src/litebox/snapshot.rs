//! Snapshots and clones of a stopped Box's disk (`boxlite snapshot …`, `boxlite clone`).
//!
//! Both work on the Box's qcow2 overlay (qcow2 spec: internal snapshots, backing files) through
//! [`BoxDisk`]; this module adds what the disk alone does not know: the Box's lock and state, its
//! name in errors, and for a clone the new Box's record (same configuration, its own id, name and
//! MAC address, and `cloned_from` naming the source).
//!
//! Only a stopped Box is touched: its state must be `created` or `exited`, and the disk must not
//! be held by a VM (QEMU's image lock, checked by [`BoxDisk::ensure_stopped`]).
//!
//! How a clone shares data (see [`crate::rootfs::disk`]): the source's overlay is frozen into
//! `boxes/.layers/` and both Boxes get a fresh overlay on top of it, so removing either Box never
//! removes what the other one still reads; frozen layers go only when `image prune` finds that no
//! Box disk's chain reaches them. A source with snapshots is copied instead (the clone then
//! carries the source's snapshots too).

use serde::Serialize;
use tracing::info;

use super::LiteBox;
use crate::rootfs::disk::{BoxDisk, DiskError};
use crate::runtime::config::merge_env;
use crate::runtime::record::{self, BoxRecord, BoxState};
use crate::runtime::{mac_for, new_id, validate_name, RuntimeError};

/// A failed snapshot or clone.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The Box runs (or is starting or stopping): its disk is in use.
    #[error("box {name} is {state}: stop it before you {operation}")]
    NotStopped {
        name: String,
        state: BoxState,
        operation: &'static str,
    },
    /// The disk operation failed (no such snapshot, a name in use, a VM holding the disk…).
    #[error("box {name}: cannot {operation}")]
    Disk {
        name: String,
        operation: &'static str,
        #[source]
        source: Box<DiskError>,
    },
    /// The Box, its lock or the state database.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// One snapshot of a Box's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoxSnapshot {
    pub name: String,
    /// qcow2's snapshot id (a number as text).
    pub id: String,
    /// Seconds since the epoch when it was taken.
    pub created_at: i64,
}

impl LiteBox {
    /// Takes snapshot `name` of the stopped Box's disk.
    ///
    /// ```no_run
    /// # let rt = boxlite::runtime::Runtime::from_env()?;
    /// let bx = rt.get("web")?;
    /// bx.snapshot_create("before-upgrade")?;
    /// // … start, break things, stop …
    /// bx.snapshot_restore("before-upgrade")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.with_stopped_disk("take a snapshot", |disk| disk.snapshot_create(name))?;
        info!(box_id = %self.record.id, snapshot = name, "snapshot taken");
        Ok(())
    }

    /// The snapshots of the Box's disk, oldest first (the Box may run: listing reads only).
    pub fn snapshots(&self) -> Result<Vec<BoxSnapshot>> {
        let disk = self.open_disk("list snapshots")?;
        let list = disk.snapshots().map_err(self.disk_err("list snapshots"))?;
        Ok(list
            .into_iter()
            .map(|s| BoxSnapshot {
                name: s.name,
                id: s.id,
                created_at: s.date_sec,
            })
            .collect())
    }

    /// Returns the stopped Box's disk to snapshot `name`; everything written after it is lost.
    pub fn snapshot_restore(&self, name: &str) -> Result<()> {
        self.with_stopped_disk("restore a snapshot", |disk| disk.snapshot_restore(name))?;
        info!(box_id = %self.record.id, snapshot = name, "snapshot restored");
        Ok(())
    }

    /// Deletes snapshot `name` of the stopped Box's disk (the disk's current state stays).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.with_stopped_disk("delete a snapshot", |disk| disk.snapshot_delete(name))?;
        info!(box_id = %self.record.id, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Grows the stopped Box's disk to `size` bytes (virtual and thin: nothing is written now);
    /// the guest's filesystem grows to fill it at the next start. Shrinking is refused.
    pub fn grow_disk(&self, size: u64) -> Result<()> {
        let record = self.with_stopped_disk("grow the disk", |disk| disk.grow(size))?;
        let mut config = record.config;
        config.disk_size = size;
        let db = self.runtime.db()?;
        BoxRecord::update_config(&db, &record.id, &config).map_err(RuntimeError::from)?;
        info!(box_id = %record.id, size, "disk grown");
        Ok(())
    }

    /// Creates Box `new_name` (not started) with this stopped Box's configuration and current
    /// disk contents. The two share what was written so far; later writes of either stay its
    /// own. The clone gets its own id and MAC address, and its `HOSTNAME` follows its name.
    pub fn clone_as(&self, new_name: &str) -> Result<LiteBox> {
        validate_name(new_name)?;
        let runtime = &self.runtime;
        let db = runtime.db()?;
        if BoxRecord::find(&db, new_name)
            .map_err(RuntimeError::from)?
            .is_some()
        {
            return Err(RuntimeError::NameInUse(new_name.into()).into());
        }

        let id = new_id();
        let source = self.with_stopped_disk("clone it", |disk| {
            disk.clone_to(runtime.home(), &id).map(drop)
        })?;
        let record = clone_record(&source, &id, new_name);
        let inserted = record.insert(&db).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                RuntimeError::NameInUse(new_name.into())
            }
            e => e.into(),
        });
        if let Err(e) = inserted {
            // The clone's folder holds only its fresh overlay; the source is unaffected.
            let _ = std::fs::remove_dir_all(runtime.home().box_dir(&id));
            return Err(e.into());
        }
        info!(from = %self.record.id, box_id = %id, name = new_name, "box cloned");
        Ok(LiteBox::new(runtime.clone(), record))
    }

    /// Runs `op` on the disk while holding the Box's lock, after checking that the Box is
    /// stopped; returns the record as checked.
    fn with_stopped_disk(
        &self,
        operation: &'static str,
        op: impl FnOnce(&BoxDisk) -> std::result::Result<(), DiskError>,
    ) -> Result<BoxRecord> {
        let _lock = self.lock()?;
        let db = self.runtime.db()?;
        let record = BoxRecord::get(&db, &self.record.id)
            .map_err(RuntimeError::from)?
            .ok_or_else(|| RuntimeError::BoxNotFound(self.record.name.clone()))?
            .reconcile(&db)
            .map_err(RuntimeError::from)?;
        if !matches!(record.state, BoxState::Created | BoxState::Exited) {
            return Err(SnapshotError::NotStopped {
                name: record.name,
                state: record.state,
                operation,
            });
        }
        let disk = self.open_disk(operation)?;
        disk.ensure_stopped().map_err(self.disk_err(operation))?;
        op(&disk).map_err(self.disk_err(operation))?;
        Ok(record)
    }

    fn open_disk(&self, operation: &'static str) -> Result<BoxDisk> {
        BoxDisk::open(self.runtime.home(), &self.record.id).map_err(self.disk_err(operation))
    }

    fn disk_err(&self, operation: &'static str) -> impl FnOnce(DiskError) -> SnapshotError + '_ {
        move |source| SnapshotError::Disk {
            name: self.record.name.clone(),
            operation,
            source: Box::new(source),
        }
    }
}

/// The record of a new clone of `source`: the same configuration with its own identity.
fn clone_record(source: &BoxRecord, id: &str, name: &str) -> BoxRecord {
    let mut config = source.config.clone();
    config.mac = mac_for(id);
    config.cloned_from = Some(source.id.clone());
    config.auto_remove = false;
    let old_host = format!("HOSTNAME={}", source.name);
    let new_host = [format!("HOSTNAME={name}")];
    for env in [&mut config.main.env, &mut config.exec_defaults.env] {
        if env.contains(&old_host) {
            *env = merge_env(env, &new_host);
        }
    }
    BoxRecord {
        id: id.to_string(),
        name: name.to_string(),
        image: source.image.clone(),
        created_at: record::now(),
        config,
        state: BoxState::Created,
        shim_pid: None,
        vmm_pid: None,
        exit_reason: None,
        exit_code: None,
        started_at: None,
        finished_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::config::{BoxConfig, ProcessSpec, RootfsSource};

    fn source() -> BoxRecord {
        let spec = |env: Vec<String>| ProcessSpec {
            argv: vec!["sleep".into(), "1".into()],
            env,
            cwd: "/".into(),
            user: String::new(),
            tty: false,
        };
        let env = vec!["PATH=/bin".to_string(), "HOSTNAME=web".to_string()];
        BoxRecord {
            id: "a".repeat(32),
            name: "web".into(),
            image: "localhost/x:1".into(),
            created_at: 1,
            config: BoxConfig {
                rootfs: RootfsSource::Dir { path: "/x".into() },
                main: spec(env.clone()),
                exec_defaults: spec(env),
                cpus: 1,
                memory_mib: 256,
                disk_size: 1 << 30,
                mounts: vec![],
                ports: vec![],
                network: Default::default(),
                dns: vec![],
                allow_host: false,
                auto_remove: true,
                accel: Default::default(),
                mac: mac_for(&"a".repeat(32)),
                cloned_from: None,
            },
            state: BoxState::Exited,
            shim_pid: None,
            vmm_pid: None,
            exit_reason: Some("stopped".into()),
            exit_code: Some(0),
            started_at: Some(1),
            finished_at: Some(2),
        }
    }

    #[test]
    fn a_clone_has_its_own_identity_and_the_same_configuration() {
        let src = source();
        let id = "b1c2d3".repeat(5) + "00";
        let clone = clone_record(&src, &id, "web2");
        assert_eq!(clone.id, id);
        assert_eq!(clone.name, "web2");
        assert_eq!(clone.state, BoxState::Created);
        assert_eq!(clone.exit_reason, None);
        assert_eq!(clone.config.cloned_from.as_deref(), Some(src.id.as_str()));
        assert_ne!(clone.config.mac, src.config.mac);
        assert_eq!(clone.config.mac, "52:54:00:b1:c2:d3");
        assert_eq!(clone.config.main.argv, src.config.main.argv);
        assert_eq!(clone.config.memory_mib, src.config.memory_mib);
        assert!(!clone.config.auto_remove, "a clone is kept until removed");
        for env in [&clone.config.main.env, &clone.config.exec_defaults.env] {
            assert_eq!(env, &vec!["PATH=/bin".to_string(), "HOSTNAME=web2".into()]);
        }
    }

    #[test]
    fn a_hostname_the_user_chose_is_kept() {
        let mut src = source();
        src.config.main.env = vec!["HOSTNAME=chosen".into()];
        let clone = clone_record(&src, &"c".repeat(32), "other");
        assert_eq!(clone.config.main.env, vec!["HOSTNAME=chosen".to_string()]);
    }

    #[test]
    fn old_records_without_lineage_still_load() {
        let mut value = serde_json::to_value(source().config).unwrap();
        value.as_object_mut().unwrap().remove("cloned_from");
        let config: BoxConfig = serde_json::from_value(value).unwrap();
        assert_eq!(config.cloned_from, None);
    }
}
