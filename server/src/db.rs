//! The server's storage: one SQLite file in the data directory, nothing to
//! install. Migrations are numbered SQL scripts applied in order and
//! recorded in `user_version`, so a newer server upgrades an older file and
//! an older server refuses a newer one. Every query runs on tokio's
//! blocking pool, one at a time (SQLite has one writer anyway).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::error::ApiError;

/// The schema, one migration per entry; never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE teams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    team_id INTEGER REFERENCES teams(id),
    created INTEGER NOT NULL
);
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL REFERENCES users(id),
    kind TEXT NOT NULL,
    machine TEXT,
    created INTEGER NOT NULL,
    last_used INTEGER,
    revoked INTEGER
);
CREATE TABLE device_codes (
    device_hash TEXT PRIMARY KEY,
    user_code TEXT NOT NULL UNIQUE,
    machine TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    user_id INTEGER REFERENCES users(id),
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE policies (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    team_id INTEGER REFERENCES teams(id),
    version INTEGER NOT NULL,
    text TEXT NOT NULL,
    author INTEGER NOT NULL REFERENCES users(id),
    created INTEGER NOT NULL
);
CREATE UNIQUE INDEX policies_version ON policies(scope, IFNULL(team_id, 0), version);
CREATE TABLE admin_log (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor INTEGER,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    details TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE audit_records (
    id INTEGER PRIMARY KEY,
    machine TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    ts TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id),
    team_id INTEGER REFERENCES teams(id),
    surface TEXT,
    action TEXT NOT NULL,
    decision TEXT,
    line TEXT NOT NULL,
    received INTEGER NOT NULL,
    UNIQUE (machine, session, seq)
);
CREATE INDEX audit_records_ts ON audit_records(ts);
CREATE INDEX audit_records_user ON audit_records(user_id, id);
CREATE TABLE audit_heads (
    machine TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (machine, session)
);
CREATE TABLE audit_flags (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    machine TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    details TEXT NOT NULL
);
"#,
];

/// The database, shared by every request.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (or creates) `path` and brings its schema up to date.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let mut conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the database {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
        )?;
        migrate(&mut conn)
            .map_err(|e| anyhow::anyhow!("cannot migrate the database {}: {e}", path.display()))?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection, off the async threads.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("a database task failed: {e}")))?
    }

    /// The same, for code that is not async (startup).
    pub fn run_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let have: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if have > MIGRATIONS.len() {
        anyhow::bail!(
            "it is at schema {have}, newer than this server knows ({}): run the newer sbx-server",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A value of the `meta` table.
pub fn meta(c: &Connection, key: &str) -> Result<Option<String>, ApiError> {
    use rusqlite::OptionalExtension;
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?,
    )
}

pub fn set_meta(c: &Connection, key: &str, value: &str) -> Result<(), ApiError> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
        [key, value],
    )?;
    Ok(())
}

/// Records an administrative action (who did what to what).
pub fn log_admin(
    c: &Connection,
    actor: Option<i64>,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    c.execute(
        "INSERT INTO admin_log (at, actor, action, target, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![now(), actor, action, target, details.to_string()],
    )?;
    Ok(())
}
