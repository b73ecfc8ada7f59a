//! An `sbx-server` for the benchmarks, in this process on the loopback,
//! its data in SQLite under `dir` or in a PostgreSQL of the bench's own.

use std::path::Path;
use std::time::Duration;

/// A running server: its address, its setup token and its database's kind.
pub struct LocalServer {
    pub url: String,
    pub setup: String,
    pub kind: &'static str,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts one, each token allowed to ask as fast as it can.
pub fn start(dir: &Path, postgres: bool, ttl: Duration) -> anyhow::Result<LocalServer> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    let database = postgres
        .then(|| sbx_server::testing::postgres_database(&format!("bench-{}", std::process::id())));
    let opened = sbx_server::open(sbx_server::Config {
        data: dir.join("server"),
        database,
        database_ca: None,
        bundle_ttl: ttl,
        public_url: url.clone(),
        per_token_per_minute: u32::MAX,
        refusal_burst: Default::default(),
        siem: Default::default(),
    })?;
    let (setup, kind) = (
        opened.setup_token.clone().unwrap_or_default(),
        opened.state.db.kind(),
    );
    let (stop, _thread) = sbx_server::testing::serve_in_thread(opened.state, listener);
    Ok(LocalServer {
        url,
        setup,
        kind,
        _stop: stop,
    })
}
