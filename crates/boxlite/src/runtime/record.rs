//! A Box as the state database knows it, and the state machine it moves through:
//!
//! ```text
//! created ──start──► running ──stop / main exits / VMM dies──► exited ──start──► running
//!    └──────────────────────────── rm ───────────────────────────┘
//! ```
//! `running` is only believed while the shim process that claims it is alive; a dead shim turns
//! the Box into `exited` with the reason recorded (see [`BoxRecord::reconcile`]).
//!
//! A Box that is not running holds no volume: every way out of `running` (the shim's own exit,
//! `rm -f`, a dead shim found by `reconcile`) releases the Box's rows in `volume_leases` (the
//! table `crate::volumes::store` keeps) in the same transaction that records the new state.

use std::fmt;
use std::str::FromStr;

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::config::BoxConfig;
use crate::home::Home;
use crate::state::Db;

/// Lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxState {
    Created,
    Starting,
    Running,
    Stopping,
    Exited,
}

impl fmt::Display for BoxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BoxState::Created => "created",
            BoxState::Starting => "starting",
            BoxState::Running => "running",
            BoxState::Stopping => "stopping",
            BoxState::Exited => "exited",
        })
    }
}

impl BoxState {
    /// Between start and exit: a shim owns (or is bringing up) the VM.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            BoxState::Running | BoxState::Starting | BoxState::Stopping
        )
    }
}

impl FromStr for BoxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "created" => BoxState::Created,
            "starting" => BoxState::Starting,
            "running" => BoxState::Running,
            "stopping" => BoxState::Stopping,
            "exited" => BoxState::Exited,
            other => return Err(format!("unknown box state {other:?}")),
        })
    }
}

/// One row of the `boxes` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    pub created_at: i64,
    pub config: BoxConfig,
    pub state: BoxState,
    pub shim_pid: Option<i64>,
    pub vmm_pid: Option<i64>,
    /// Why the Box last stopped (`stopped`, `main process exited with 3`, `VMM killed by signal 9`).
    pub exit_reason: Option<String>,
    /// The main process's exit code when it ended by itself.
    pub exit_code: Option<i32>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl BoxRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<BoxRecord> {
        let config: String = row.get("config")?;
        let state: String = row.get("state")?;
        let conv = |e: String| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
        };
        Ok(BoxRecord {
            id: row.get("id")?,
            name: row.get("name")?,
            image: row.get("image")?,
            created_at: row.get("created_at")?,
            config: serde_json::from_str(&config).map_err(|e| conv(e.to_string()))?,
            state: state.parse().map_err(conv)?,
            shim_pid: row.get("shim_pid")?,
            vmm_pid: row.get("vmm_pid")?,
            exit_reason: row.get("exit_reason")?,
            exit_code: row.get("exit_code")?,
            started_at: row.get("started_at")?,
            finished_at: row.get("finished_at")?,
        })
    }

    pub fn insert(&self, db: &Db) -> rusqlite::Result<()> {
        db.conn().execute(
            "INSERT INTO boxes (id, name, image, created_at, config, state) VALUES (?1,?2,?3,?4,?5,?6)",
            params![
                self.id,
                self.name,
                self.image,
                self.created_at,
                serde_json::to_string(&self.config).expect("config serializes"),
                self.state.to_string()
            ],
        )?;
        Ok(())
    }

    /// Looks a Box up by exact name, exact id, or a unique id prefix (like docker).
    pub fn find(db: &Db, key: &str) -> rusqlite::Result<Option<BoxRecord>> {
        let conn = db.conn();
        let exact = conn
            .query_row(
                "SELECT * FROM boxes WHERE name = ?1 OR id = ?1",
                [key],
                BoxRecord::from_row,
            )
            .optional()?;
        if exact.is_some() || key.len() < 4 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(exact);
        }
        let mut stmt = conn.prepare("SELECT * FROM boxes WHERE id LIKE ?1 || '%'")?;
        let found: Vec<BoxRecord> = stmt
            .query_map([key], BoxRecord::from_row)?
            .collect::<Result<_, _>>()?;
        Ok(if found.len() == 1 {
            found.into_iter().next()
        } else {
            None
        })
    }

    pub fn get(db: &Db, id: &str) -> rusqlite::Result<Option<BoxRecord>> {
        db.conn()
            .query_row(
                "SELECT * FROM boxes WHERE id = ?1",
                [id],
                BoxRecord::from_row,
            )
            .optional()
    }

    pub fn list(db: &Db) -> rusqlite::Result<Vec<BoxRecord>> {
        let mut stmt = db
            .conn()
            .prepare("SELECT * FROM boxes ORDER BY created_at, name")?;
        let rows = stmt
            .query_map([], BoxRecord::from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes the Box's row and its volume leases.
    /// Replaces the stored configuration of Box `id`.
    pub fn update_config(db: &Db, id: &str, config: &BoxConfig) -> rusqlite::Result<()> {
        db.conn().execute(
            "UPDATE boxes SET config=?2 WHERE id=?1",
            params![
                id,
                serde_json::to_string(config).expect("config serializes")
            ],
        )?;
        Ok(())
    }

    pub fn delete(db: &Db, id: &str) -> rusqlite::Result<()> {
        let tx = db.conn().unchecked_transaction()?;
        tx.execute("DELETE FROM boxes WHERE id = ?1", [id])?;
        release_leases(&tx, id)?;
        tx.commit()
    }

    /// The shim started and owns the VM.
    pub fn mark_running(db: &Db, id: &str, shim_pid: u32, vmm_pid: u32) -> rusqlite::Result<()> {
        db.conn().execute(
            "UPDATE boxes SET state='running', shim_pid=?2, vmm_pid=?3, exit_reason=NULL,
             exit_code=NULL, started_at=?4, finished_at=NULL WHERE id=?1",
            params![id, shim_pid, vmm_pid, now()],
        )?;
        Ok(())
    }

    pub fn mark_state(db: &Db, id: &str, state: BoxState) -> rusqlite::Result<()> {
        db.conn().execute(
            "UPDATE boxes SET state=?2 WHERE id=?1",
            params![id, state.to_string()],
        )?;
        Ok(())
    }

    /// The Box is no longer running, for `reason`; the volumes it held are free again.
    pub fn mark_exited(
        db: &Db,
        id: &str,
        reason: &str,
        exit_code: Option<i32>,
    ) -> rusqlite::Result<()> {
        let tx = db.conn().unchecked_transaction()?;
        tx.execute(
            "UPDATE boxes SET state='exited', shim_pid=NULL, vmm_pid=NULL, exit_reason=?2,
             exit_code=?3, finished_at=?4 WHERE id=?1",
            params![id, reason, exit_code, now()],
        )?;
        release_leases(&tx, id)?;
        tx.commit()
    }

    /// Whether the Box is (or claims to be) between start and exit.
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }

    /// A Box that claims to run but whose shim is gone is recorded as exited, with the reason.
    pub fn reconcile(mut self, db: &Db) -> rusqlite::Result<BoxRecord> {
        if self.is_live() && !self.shim_pid.is_some_and(|pid| shim_alive(pid, &self.id)) {
            let reason = "shim process died unexpectedly";
            BoxRecord::mark_exited(db, &self.id, reason, None)?;
            self.state = BoxState::Exited;
            self.exit_reason = Some(reason.into());
            self.shim_pid = None;
            self.vmm_pid = None;
        }
        Ok(self)
    }
}

/// Releases the volume leases of Boxes that no longer run: Boxes whose shim died (reconciled
/// here) and Boxes removed while an older boxlite did not release their leases. Returns the ids
/// of the Boxes whose leases were released.
///
/// A shim records its Box as `starting` before it acquires a lease, and acquiring takes the
/// database's write lock, which the final pass here holds: a lease whose Box is not live in that
/// pass is stale, never one being taken.
///
/// Read-write volumes of such Boxes are checked and cleared of leaked clusters first (see
/// [`crate::volumes::store::repair_after_use`]).
pub fn release_stale_leases(db: &Db, home: &Home) -> rusqlite::Result<Vec<String>> {
    for id in lease_holders(db.conn())? {
        if let Some(record) = BoxRecord::get(db, &id)? {
            record.reconcile(db)?;
        }
    }
    let tx =
        rusqlite::Transaction::new_unchecked(db.conn(), rusqlite::TransactionBehavior::Immediate)?;
    let mut released = Vec::new();
    for id in lease_holders(&tx)? {
        let state: Option<String> = tx
            .query_row("SELECT state FROM boxes WHERE id = ?1", [&id], |r| r.get(0))
            .optional()?;
        let live = state
            .and_then(|s| s.parse::<BoxState>().ok())
            .is_some_and(BoxState::is_live);
        if !live {
            let mut stmt = tx.prepare(
                "SELECT volume FROM volume_leases WHERE box_id = ?1 AND read_write ORDER BY volume",
            )?;
            let written: Vec<String> = stmt
                .query_map([&id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            drop(stmt);
            for volume in &written {
                crate::volumes::store::repair_after_use(home, volume);
            }
            release_leases(&tx, &id)?;
            tracing::info!(box_id = %id, "released the volume leases of a box that is gone");
            released.push(id);
        }
    }
    tx.commit()?;
    Ok(released)
}

fn lease_holders(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT DISTINCT box_id FROM volume_leases ORDER BY box_id")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

fn release_leases(conn: &rusqlite::Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM volume_leases WHERE box_id = ?1", [id])?;
    Ok(())
}

/// Whether `pid` is the shim of Box `id` (guards against a recycled pid).
pub fn shim_alive(pid: i64, id: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let text = String::from_utf8_lossy(&cmdline);
            text.contains(id) && text.contains("shim")
        }
        Err(_) => false,
    }
}

impl BoxRecord {
    /// A shim was spawned for the Box and is booting it.
    pub fn mark_starting(db: &Db, id: &str, shim_pid: u32) -> rusqlite::Result<()> {
        db.conn().execute(
            "UPDATE boxes SET state='starting', shim_pid=?2, vmm_pid=NULL, exit_reason=NULL,
             exit_code=NULL WHERE id=?1",
            params![id, shim_pid],
        )?;
        Ok(())
    }
}
