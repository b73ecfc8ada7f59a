//! The server's storage: one SQLite file in the data directory by default
//! (nothing to install), or PostgreSQL (`--database postgres://...`) for
//! several server instances behind a load balancer.
//!
//! Both run the same SQL, written once for both: `?N` placeholders (made
//! `$N` for PostgreSQL), `INTEGER` columns (made `BIGINT`), `RETURNING id`
//! for new rows. Every request's work is one transaction, committed when it
//! returns `Ok` and rolled back otherwise, on tokio's blocking pool.
//!
//! Migrations are numbered scripts applied in order and recorded (SQLite's
//! `user_version`, a `sbx_schema` table in PostgreSQL), so a newer server
//! upgrades an older database and an older server refuses a newer one.

mod postgres;
mod sql;

pub(crate) use postgres::message as postgres_message;
pub use sql::{Cell, FromCell, Param, Row, Value};

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::ApiError;

/// `&[&dyn Param]` from a list of values: `params![a, b]`.
#[macro_export]
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$(&$p as &dyn $crate::db::Param),*] as &[&dyn $crate::db::Param]
    };
}
pub use crate::params;

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
    // The admin log becomes a chain of audit records, like a session's:
    // each action's line, hashed over the one before.
    r#"
ALTER TABLE admin_log ADD COLUMN seq INTEGER;
ALTER TABLE admin_log ADD COLUMN line TEXT;
ALTER TABLE admin_log ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX admin_log_seq ON admin_log(seq);
"#,
    // People signed in to the dashboard: a cookie's hash, its CSRF token.
    r#"
CREATE TABLE web_sessions (
    hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    token_id INTEGER NOT NULL REFERENCES tokens(id),
    csrf TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
"#,
    // Alerts, the webhooks they go to, and every attempt to deliver them.
    r#"
CREATE TABLE webhooks (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL,
    format TEXT NOT NULL,
    secret TEXT NOT NULL,
    created INTEGER NOT NULL,
    removed INTEGER
);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    machine TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_id INTEGER REFERENCES users(id),
    team_id INTEGER REFERENCES teams(id),
    summary TEXT NOT NULL,
    acked_by INTEGER REFERENCES users(id),
    acked_at INTEGER
);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts(id),
    webhook_id INTEGER NOT NULL REFERENCES webhooks(id),
    attempts INTEGER NOT NULL,
    next_at INTEGER NOT NULL,
    delivered_at INTEGER,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX deliveries_due ON deliveries(next_at);
CREATE TABLE delivery_attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    at INTEGER NOT NULL,
    status INTEGER,
    error TEXT
);
"#,
    // Running totals for the dashboard (`rollup.rs`), filled from what is
    // stored already; refusals by resource count from here on (the
    // resource is only in the records' lines).
    r#"
CREATE TABLE audit_sessions (
    machine TEXT NOT NULL,
    session TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    first_ts TEXT NOT NULL,
    last_ts TEXT NOT NULL,
    records INTEGER NOT NULL,
    denied INTEGER NOT NULL,
    stopped INTEGER NOT NULL,
    PRIMARY KEY (machine, session)
);
CREATE INDEX audit_sessions_last ON audit_sessions(last_ts);
CREATE TABLE audit_counts (
    hour TEXT NOT NULL,
    surface TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    allowed INTEGER NOT NULL,
    denied INTEGER NOT NULL,
    PRIMARY KEY (hour, surface, user_id, team_id)
);
CREATE TABLE audit_refusals (
    day TEXT NOT NULL,
    surface TEXT NOT NULL,
    resource TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    team_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (day, surface, resource, user_id, team_id)
);
INSERT INTO audit_sessions
    SELECT machine, session, MIN(user_id), COALESCE(MIN(team_id), 0), MIN(ts), MAX(ts), COUNT(*),
           COUNT(CASE WHEN decision IS NOT NULL AND decision <> 'allow' THEN 1 END),
           CASE WHEN COUNT(CASE WHEN action = 'stop' THEN 1 END) > 0 THEN 1 ELSE 0 END
    FROM audit_records GROUP BY machine, session;
INSERT INTO audit_counts
    SELECT substr(ts, 1, 13), COALESCE(surface, ''), user_id, COALESCE(team_id, 0),
           COUNT(CASE WHEN decision = 'allow' THEN 1 END), COUNT(CASE WHEN decision <> 'allow' THEN 1 END)
    FROM audit_records WHERE decision IS NOT NULL GROUP BY 1, 2, 3, 4;
"#,
    // A person's refusals in the last minutes (`alerts::check_refusals`).
    r#"
CREATE INDEX audit_records_user_received ON audit_records(user_id, received);
"#,
    // Where each SIEM sink is in the records (`siem.rs`).
    r#"
CREATE TABLE siem_cursors (
    sink TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,
    leased_until INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    last_ok INTEGER,
    last_error TEXT
);
"#,
];

/// Which database, and its connections.
enum Backend {
    /// One connection: SQLite has one writer anyway.
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Box<postgres::Pool>),
}

/// The database, shared by every request.
#[derive(Clone)]
pub struct Db {
    backend: Arc<Backend>,
}

/// One request's transaction.
pub struct Tx<'a> {
    inner: TxInner<'a>,
}

enum TxInner<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Tx<'a>),
}

impl Db {
    /// Opens (or creates) the SQLite file at `path` and brings its schema up
    /// to date.
    pub fn sqlite(path: &Path) -> anyhow::Result<Db> {
        let mut conn = rusqlite::Connection::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the database {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
        )?;
        migrate_sqlite(&mut conn)
            .map_err(|e| anyhow::anyhow!("cannot migrate the database {}: {e}", path.display()))?;
        Ok(Db {
            backend: Arc::new(Backend::Sqlite(Mutex::new(conn))),
        })
    }

    /// Connects to PostgreSQL at `url` (`postgres://user@host/db` or
    /// `host=... dbname=...`; TLS with `sslmode=require`, its certificate
    /// checked against the host's roots and `ca`) and brings its schema up
    /// to date. Not from async code: the client blocks.
    pub fn postgres(url: &str, ca: Option<&Path>) -> anyhow::Result<Db> {
        let pool = postgres::Pool::open(url, ca, MIGRATIONS)?;
        Ok(Db {
            backend: Arc::new(Backend::Postgres(Box::new(pool))),
        })
    }

    /// `sqlite` or `postgres`, for logs and benches.
    pub fn kind(&self) -> &'static str {
        match &*self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Runs `f` in a transaction, off the async threads; commits when it
    /// returns `Ok`.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.run_now(f))
            .await
            .map_err(|e| ApiError::Internal(format!("a database task failed: {e}")))?
    }

    /// The same, on this thread (startup, and the blocking pool).
    pub fn run_now<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        match &*self.backend {
            Backend::Sqlite(conn) => {
                let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                let mut tx = Tx {
                    inner: TxInner::Sqlite(c.transaction()?),
                };
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(pool) => pool.run(|tx| {
                let mut tx = Tx {
                    inner: TxInner::Postgres(tx),
                };
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }),
        }
    }
}

impl Tx<'_> {
    fn commit(self) -> Result<(), ApiError> {
        match self.inner {
            TxInner::Sqlite(t) => Ok(t.commit()?),
            TxInner::Postgres(t) => t.commit(),
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64, ApiError> {
        match &mut self.inner {
            TxInner::Sqlite(t) => {
                let mut st = t.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(sql::sqlite_values(params)))? as u64)
            }
            TxInner::Postgres(t) => t.execute(sql, params),
        }
    }

    /// The rows a query returns.
    fn rows(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>, ApiError> {
        match &mut self.inner {
            TxInner::Sqlite(t) => {
                let mut st = t.prepare_cached(sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(sql::sqlite_values(params)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(sql::sqlite_row(r)?);
                }
                Ok(out)
            }
            TxInner::Postgres(t) => t.query(sql, params),
        }
    }

    /// Every row a query returns, each through `f`.
    pub fn query_map<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnMut(&Row) -> Result<T, ApiError>,
    ) -> Result<Vec<T>, ApiError> {
        self.rows(sql, params)?.iter().map(f).collect()
    }

    /// The first row a query returns, through `f`; None without one.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row) -> Result<T, ApiError>,
    ) -> Result<Option<T>, ApiError> {
        self.rows(sql, params)?.first().map(f).transpose()
    }

    /// The row a query must return (a count, a new row's id).
    pub fn query_one<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.query_opt(sql, params, f)?
            .ok_or_else(|| ApiError::Internal(format!("no row from `{sql}`")))
    }

    /// Makes writers of `what` wait for each other until this transaction
    /// ends, across server instances (PostgreSQL's advisory locks; SQLite
    /// has one writer already): for chains, whose next link depends on the
    /// last.
    pub fn serialize(&mut self, what: &str) -> Result<(), ApiError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(t) => t.advisory_lock(what),
        }
    }
}

fn migrate_sqlite(conn: &mut rusqlite::Connection) -> anyhow::Result<()> {
    let have: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    check_schema(have)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// Refuses a database a newer server migrated.
fn check_schema(have: usize) -> anyhow::Result<()> {
    if have > MIGRATIONS.len() {
        anyhow::bail!(
            "it is at schema {have}, newer than this server knows ({}): run the newer sbx-server",
            MIGRATIONS.len()
        );
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
pub fn meta(c: &mut Tx<'_>, key: &str) -> Result<Option<String>, ApiError> {
    c.query_opt("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
        r.get(0)
    })
}

pub fn set_meta(c: &mut Tx<'_>, key: &str, value: &str) -> Result<(), ApiError> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}
