//! The state database: one SQLite file under the home folder.
//!
//! Each module owns its tables and declares them in [`SCHEMA`]; every statement there is
//! idempotent (`CREATE TABLE IF NOT EXISTS`) so old homes keep opening. Writers use immediate
//! transactions and a busy timeout, so two CLIs acting at once queue instead of failing.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use crate::home::Home;

/// Table definitions, by owning module.
const SCHEMA: &[&str] = &[
    // runtime: Boxes and their lifecycle.
    "CREATE TABLE IF NOT EXISTS boxes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        config TEXT NOT NULL,
        state TEXT NOT NULL,
        shim_pid INTEGER,
        vmm_pid INTEGER,
        exit_reason TEXT,
        exit_code INTEGER,
        started_at INTEGER,
        finished_at INTEGER
    )",
    // images: one row per image (by config digest), the record as JSON; references point at one.
    "CREATE TABLE IF NOT EXISTS images (
        id TEXT PRIMARY KEY,
        manifest_digest TEXT NOT NULL,
        record TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS image_references (
        reference TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
    )",
    // volumes: named qcow2 volumes and which Boxes hold them.
    "CREATE TABLE IF NOT EXISTS volumes (
        name TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        backing TEXT,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS volume_leases (
        volume TEXT NOT NULL,
        box_id TEXT NOT NULL,
        read_write INTEGER NOT NULL,
        acquired_at INTEGER NOT NULL,
        PRIMARY KEY (volume, box_id)
    )",
];

/// An open connection to the state database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens the database of `home`, creating tables that are missing.
    pub fn open(home: &Home) -> rusqlite::Result<Db> {
        Db::open_path(&home.db_path())
    }

    pub fn open_path(path: &Path) -> rusqlite::Result<Db> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // Switching to WAL and creating tables take locks that SQLite's busy handler does not
        // always wait for (a second process opening a fresh home at the same moment gets
        // SQLITE_BUSY at once), so the first-open steps retry for as long as the busy timeout.
        let started = std::time::Instant::now();
        loop {
            match Db::initialise(&conn) {
                Ok(()) => break,
                Err(e) if is_busy(&e) && started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Db { conn })
    }

    fn initialise(conn: &Connection) -> rusqlite::Result<()> {
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let tx = conn.unchecked_transaction()?;
        for stmt in SCHEMA {
            tx.execute_batch(stmt)?;
        }
        tx.commit()
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_processes_opening_a_fresh_database_at_once_all_succeed() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("boxlite.db");
            let openers: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || Db::open_path(&path).map(|_| ()))
                })
                .collect();
            for opener in openers {
                opener
                    .join()
                    .unwrap()
                    .expect("concurrent first opens must not fail as busy");
            }
            let db = Db::open_path(&path).unwrap();
            let mode: String = db
                .conn()
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }
}
