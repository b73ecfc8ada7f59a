//! PostgreSQL: a small pool of blocking clients, each keeping the
//! statements it prepared. Used only from tokio's blocking pool and at
//! startup: the client blocks.
//!
//! TLS: `sslmode=require` (or `verify-ca`, `verify-full`) gets TLS with the
//! server's certificate verified against the host's roots and the
//! `--database-ca` file, like `verify-full`; anything less is plain TCP,
//! since TLS that verifies nothing protects nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use ::postgres::config::SslMode;
use ::postgres::types::{ToSql, Type};
use ::postgres::{Client, Config, NoTls, Statement};
use sha2::{Digest, Sha256};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::sql::{postgres_ddl, postgres_sql, Cell, Param, Row, Value};
use crate::error::ApiError;

/// Connections per server instance.
const SIZE: usize = 8;
/// How long a request waits for a free connection.
const WAIT: Duration = Duration::from_secs(30);
/// Statements a connection keeps prepared (the audit query makes one per
/// combination of filters).
const STATEMENTS: usize = 256;

pub(crate) struct Pool {
    config: Config,
    /// None: plain TCP.
    tls: Option<MakeRustlsConnect>,
    /// Where the database is, without the password, for errors.
    name: String,
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    idle: Vec<Conn>,
    open: usize,
}

struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// One transaction on one pooled connection.
pub(crate) struct Tx<'a> {
    tx: ::postgres::Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl Pool {
    /// Connects once to check the address and migrates the schema, one
    /// server instance at a time.
    pub fn open(url: &str, ca: Option<&Path>, migrations: &[&str]) -> anyhow::Result<Pool> {
        let config: Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("the database address is not a PostgreSQL one: {e}"))?;
        let name = describe(&config);
        let tls = match config.get_ssl_mode() {
            SslMode::Require => {
                let extra: Vec<&Path> = ca.into_iter().collect();
                let mut c = (*sbx_egress::mitm::upstream_config(&extra)?).clone();
                // PostgreSQL speaks its own protocol, not HTTP's.
                c.alpn_protocols.clear();
                Some(MakeRustlsConnect::new(c))
            }
            _ if ca.is_some() => anyhow::bail!(
                "--database-ca is for TLS: add sslmode=require to the database address"
            ),
            _ => None,
        };
        let pool = Pool {
            config,
            tls,
            name,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        let mut conn = pool.connect().map_err(|e| anyhow::anyhow!("{e}"))?;
        migrate(&mut conn.client, migrations)
            .map_err(|e| anyhow::anyhow!("cannot migrate the database {}: {e}", pool.name))?;
        pool.state.lock().unwrap_or_else(|e| e.into_inner()).open = 1;
        pool.give(conn);
        Ok(pool)
    }

    fn connect(&self) -> Result<Conn, ApiError> {
        let client = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        }
        .map_err(|e| {
            ApiError::Internal(format!(
                "cannot connect to the database {}: {}",
                self.name,
                message(&e)
            ))
        })?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// Runs `f` in a transaction on a free connection.
    pub fn run<T>(&self, f: impl FnOnce(Tx<'_>) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let mut conn = self.take()?;
        let out = match conn.client.transaction() {
            Ok(tx) => f(Tx {
                tx,
                statements: &mut conn.statements,
            }),
            Err(e) => Err(e.into()),
        };
        self.give(conn);
        out
    }

    fn take(&self) -> Result<Conn, ApiError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = st.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                st.open -= 1;
                continue;
            }
            if st.open < SIZE {
                st.open += 1;
                drop(st);
                return self.connect().inspect_err(|_| {
                    self.state.lock().unwrap_or_else(|e| e.into_inner()).open -= 1;
                    self.freed.notify_one();
                });
            }
            let (g, waited) = self
                .freed
                .wait_timeout(st, WAIT)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if waited.timed_out() && st.idle.is_empty() {
                return Err(ApiError::Internal(format!(
                    "every connection to the database {} stayed busy for {}s",
                    self.name,
                    WAIT.as_secs()
                )));
            }
        }
    }

    fn give(&self, c: Conn) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if c.client.is_closed() {
            st.open -= 1;
        } else {
            st.idle.push(c);
        }
        self.freed.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A client's drop blocks on its own runtime, which panics on an
        // async thread: the server's state is dropped on one.
        let idle =
            std::mem::take(&mut self.state.get_mut().unwrap_or_else(|e| e.into_inner()).idle);
        if !idle.is_empty() {
            std::thread::spawn(move || drop(idle));
        }
    }
}

fn migrate(client: &mut Client, migrations: &[&str]) -> anyhow::Result<()> {
    let mut tx = client.transaction()?;
    // Instances starting together take turns.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key("sbx-schema")],
    )?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sbx_schema (version BIGINT NOT NULL)")?;
    let have = match tx.query_opt("SELECT version FROM sbx_schema", &[])? {
        Some(r) => r.get::<_, i64>(0) as usize,
        None => {
            tx.execute("INSERT INTO sbx_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    super::check_schema(have)?;
    for (i, sql) in migrations.iter().enumerate().skip(have) {
        tx.batch_execute(&postgres_ddl(sql))
            .map_err(|e| anyhow::anyhow!("migration {}: {}", i + 1, message(&e)))?;
    }
    tx.execute(
        "UPDATE sbx_schema SET version = $1",
        &[&(migrations.len() as i64)],
    )?;
    tx.commit()?;
    Ok(())
}

impl Tx<'_> {
    pub fn commit(self) -> Result<(), ApiError> {
        Ok(self.tx.commit()?)
    }

    fn statement(&mut self, sql: &str) -> Result<Statement, ApiError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(&postgres_sql(sql))?;
        if self.statements.len() >= STATEMENTS {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    pub fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64, ApiError> {
        let st = self.statement(sql)?;
        let args = arguments(&st, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|b| b.as_ref()).collect();
        Ok(self.tx.execute(&st, &refs)?)
    }

    pub fn query(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>, ApiError> {
        let st = self.statement(sql)?;
        let args = arguments(&st, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|b| b.as_ref()).collect();
        self.tx.query(&st, &refs)?.iter().map(row).collect()
    }

    pub fn advisory_lock(&mut self, what: &str) -> Result<(), ApiError> {
        self.tx
            .execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(what)])?;
        Ok(())
    }
}

/// The parameters as the statement's types want them.
fn arguments(
    st: &Statement,
    params: &[&dyn Param],
) -> Result<Vec<Box<dyn ToSql + Sync>>, ApiError> {
    if st.params().len() != params.len() {
        return Err(ApiError::Internal(format!(
            "database: the statement takes {} parameters, given {}",
            st.params().len(),
            params.len()
        )));
    }
    st.params()
        .iter()
        .zip(params)
        .map(|(ty, p)| -> Result<Box<dyn ToSql + Sync>, ApiError> {
            Ok(match (p.value(), ty) {
                (Value::Int(v), &Type::INT4) => Box::new(
                    v.map(i32::try_from)
                        .transpose()
                        .map_err(|e| ApiError::Internal(format!("database: {e}")))?,
                ),
                (Value::Int(v), &Type::BOOL) => Box::new(v.map(|v| v != 0)),
                (Value::Int(v), _) => Box::new(v),
                (Value::Text(v), _) => Box::new(v),
            })
        })
        .collect()
}

fn row(r: &::postgres::Row) -> Result<Row, ApiError> {
    let mut cells = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let int = |v: Option<i64>| v.map_or(Cell::Null, Cell::Int);
        cells.push(match *col.type_() {
            Type::INT8 => int(r.try_get(i)?),
            Type::INT4 => int(r.try_get::<_, Option<i32>>(i)?.map(i64::from)),
            Type::INT2 => int(r.try_get::<_, Option<i16>>(i)?.map(i64::from)),
            Type::BOOL => int(r.try_get::<_, Option<bool>>(i)?.map(i64::from)),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => r
                .try_get::<_, Option<String>>(i)?
                .map_or(Cell::Null, Cell::Text),
            ref other => {
                return Err(ApiError::Internal(format!(
                    "database: column {} is a {other}, which the server does not store",
                    col.name()
                )))
            }
        });
    }
    Ok(Row(cells))
}

/// An advisory lock's number for a name.
fn lock_key(what: &str) -> i64 {
    let d = Sha256::digest(what.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// `dbname on host:port` (never the password).
fn describe(c: &Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            ::postgres::config::Host::Tcp(h) => h.clone(),
            ::postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "`{}` on {}:{port}",
        c.get_dbname().unwrap_or("(the user's)"),
        hosts.join(",")
    )
}

/// The server's own words for an error, not only "db error", and what
/// lies under it (the TLS handshake's reason, the socket's).
pub(crate) fn message(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
