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
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        for stmt in SCHEMA {
            conn.execute_batch(stmt)?;
        }
        Ok(Db { conn })
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}
