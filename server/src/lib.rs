//! `sbx-server`, sbx's self-hostable control plane: an organisation, its
//! teams and people with their roles; machines signed in with a device
//! code; org and team policy, versioned, checked with the same parser as
//! `sbx policy check`, and served to each machine as bundles signed with
//! the organisation's key and valid for a limited time.
//!
//! - `db.rs`: the database (SQLite, or PostgreSQL for several instances)
//!   and its migrations;
//! - `admin_log.rs`: the server's own chained audit trail of
//!   administrative actions;
//! - `alerts.rs`: alerts raised as records arrive, webhooks, and
//!   `deliver.rs`, the worker that delivers them (retried, every attempt
//!   recorded);
//! - `auth.rs`: tokens and roles, checked on every route;
//! - `routes/`: the versioned JSON API (`/api/v1/...`), one file per
//!   concern: `identity.rs` (setup, teams, users, tokens), `device.rs` (the
//!   device-code sign-in), `policy.rs` (push and fetch), `audit.rs` (the
//!   machines' records: ingested with their chains checked, queried);
//! - `limits.rs`: request size and rate limits;
//! - `rollup.rs`: running totals of the audit trail, kept at ingestion,
//!   that the dashboard reads;
//! - `web/`: the dashboard, pages for people signed in with a cookie.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{delete, get, post, put};
use axum::Router;

pub mod admin_log;
mod alerts;
pub mod auth;
pub mod db;
mod deliver;
mod error;
mod limits;
mod rollup;
mod routes;
pub mod siem;
#[cfg(feature = "testing")]
pub mod testing;
mod web;

pub use alerts::RefusalBurst;
pub use error::ApiError;

/// Largest request body the API reads.
pub const MAX_BODY: usize = 1 << 20;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the SQLite database lives (made 0700 if missing).
    pub data: PathBuf,
    /// A PostgreSQL database to use instead (`postgres://...`), shared by
    /// every instance behind a load balancer.
    pub database: Option<String>,
    /// A PEM CA to trust for the database's certificate (with
    /// `sslmode=require`), besides the host's roots.
    pub database_ca: Option<PathBuf>,
    /// How long a served policy bundle stays valid on a machine that can no
    /// longer reach the server.
    pub bundle_ttl: Duration,
    /// The address people open to approve a sign-in (shown by `sbx login`).
    pub public_url: String,
    /// Requests one token may make a minute (the anonymous routes allow 60
    /// per client address).
    pub per_token_per_minute: u32,
    /// When refusals for one person raise an alert.
    pub refusal_burst: RefusalBurst,
    /// Where every record is pushed besides the pull API.
    pub siem: siem::Siem,
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: db::Db,
    pub config: Arc<Config>,
    /// The anonymous routes' limit, per client address.
    pub limiter: Arc<limits::RateLimiter<std::net::IpAddr>>,
    /// Every other route's, per token.
    pub token_limiter: Arc<limits::RateLimiter<i64>>,
    /// Wakes the alert delivery worker.
    pub alerts: Arc<tokio::sync::Notify>,
    /// Wakes the SIEM worker: records arrived.
    pub records: Arc<tokio::sync::Notify>,
}

/// The server, opened: the state and, on a fresh database, the one-time
/// setup token to print.
pub struct Opened {
    pub state: AppState,
    pub setup_token: Option<String>,
}

/// Opens the database (migrated), the organisation's signing key (made on
/// first start) and, while nobody is set up, a new setup token. Not from
/// async code: PostgreSQL's client blocks.
pub fn open(config: Config) -> anyhow::Result<Opened> {
    let db = match &config.database {
        Some(url) => db::Db::postgres(url, config.database_ca.as_deref())?,
        None => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", config.data.display()))?;
            db::Db::sqlite(&config.data.join("sbx-server.sqlite"))?
        }
    };
    let setup_token = db
        .run_now(routes::identity::prepare)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Opened {
        state: AppState {
            db,
            limiter: Arc::new(limits::RateLimiter::new(60)),
            token_limiter: Arc::new(limits::RateLimiter::new(config.per_token_per_minute)),
            alerts: Arc::new(tokio::sync::Notify::new()),
            records: Arc::new(tokio::sync::Notify::new()),
            config: Arc::new(config),
        },
        setup_token,
    })
}

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    use routes::{audit, device, identity, policy};
    Router::new()
        .route("/api/v1/setup", post(identity::setup))
        .route("/api/v1/me", get(identity::me))
        .route(
            "/api/v1/teams",
            post(identity::create_team).get(identity::list_teams),
        )
        .route(
            "/api/v1/users",
            post(identity::create_user).get(identity::list_users),
        )
        .route("/api/v1/tokens", get(identity::list_tokens))
        .route("/api/v1/tokens/{id}", delete(identity::revoke_token))
        .route("/api/v1/device/code", post(device::code))
        .route("/api/v1/device/approve", post(device::approve))
        .route("/api/v1/device/token", post(device::token))
        .route("/api/v1/policy", get(policy::fetch))
        .route(
            "/api/v1/policy/org",
            put(policy::push_org).get(policy::history_org),
        )
        .route("/api/v1/policy/teams/{team}", put(policy::push_team))
        .route("/api/v1/audit", post(audit::ingest).get(audit::query))
        .route("/api/v1/audit/heads", get(audit::heads))
        .route("/api/v1/audit/flags", get(audit::flags))
        .route("/api/v1/alerts", get(alerts::get_alerts))
        .route("/api/v1/alerts/{id}/ack", post(alerts::ack))
        .route(
            "/api/v1/webhooks",
            post(alerts::add_webhook).get(alerts::list_webhooks),
        )
        .route("/api/v1/webhooks/{id}", delete(alerts::remove_webhook))
        .route("/api/v1/siem", get(routes::audit::siem_status))
        .route("/api/v1/admin-log", get(admin_log::export))
        .route("/api/v1/admin-log/verify", get(admin_log::verify))
        .route("/api/v1/openapi.json", get(routes::openapi))
        .route("/device", get(device::page))
        .merge(web::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves `state` on `listener` until the process ends.
pub async fn serve(state: AppState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    serve_until(state, listener, std::future::pending()).await
}

/// Serves `state` on `listener` until `stop` completes.
pub async fn serve_until(
    state: AppState,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Alerts go out for as long as the server serves.
    let worker = tokio::spawn(deliver::run(state.clone()));
    let siem = tokio::spawn(siem::run(state.clone()));
    let served = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await;
    worker.abort();
    siem.abort();
    served
}
