//! `sbx-server`: the control plane's binary, kept thin.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sbx-server",
    version,
    about = "sbx's self-hostable control plane: teams, signed policy for every machine",
    long_about = "sbx's self-hostable control plane.\n\n\
On first start it prints a one-time setup token: `POST /api/v1/setup` with it makes the first \
org admin. Admins create teams and people, push org and team policy (`PUT /api/v1/policy/org`), \
and machines sign in with `sbx login URL`, after which every session start fetches the signed \
policy. The API is described at /api/v1/openapi.json."
)]
struct Args {
    /// Where the SQLite database (with the organisation's signing key)
    /// lives, unless --database names PostgreSQL.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sbx-server")]
    data: PathBuf,
    /// PostgreSQL instead of SQLite, for several instances behind a load
    /// balancer: `postgres://USER@HOST/DB` or `host=... dbname=...`. A URL
    /// with a password belongs in SBX_SERVER_DATABASE, not on the command
    /// line, where `ps` shows it.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// A PEM CA certificate to trust for the database's TLS certificate
    /// (with `sslmode=require` in its address), besides the host's roots.
    #[arg(long, value_name = "FILE")]
    database_ca: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8400")]
    listen: String,
    /// The address people and machines reach this server at (shown by
    /// `sbx login`); default: http://LISTEN.
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// How long a machine that cannot reach the server keeps using the
    /// last policy it got, in hours; after that its sessions refuse to start.
    #[arg(long, value_name = "HOURS", default_value_t = 72)]
    bundle_ttl_hours: u64,
    /// Requests one token may make a minute before it gets 429 (a machine
    /// makes a few per session: a policy fetch, audit shipping).
    #[arg(long, value_name = "N", default_value_t = 1200)]
    per_token_per_minute: u32,
    /// Refusals for one person within --refusal-alert-minutes that raise
    /// an alert (0: never).
    #[arg(long, value_name = "N", default_value_t = 20)]
    refusal_alert_count: u32,
    #[arg(long, value_name = "MINUTES", default_value_t = 10)]
    refusal_alert_minutes: u64,
    /// Push every audit record to this syslog receiver (HOST:PORT, RFC 5424
    /// over TLS as RFC 5425 frames it), at least once.
    #[arg(long, value_name = "HOST:PORT")]
    syslog: Option<String>,
    /// A PEM CA certificate to trust for the syslog receiver, besides the
    /// host's roots.
    #[arg(long, value_name = "FILE", requires = "syslog")]
    syslog_ca: Option<PathBuf>,
    /// Push every audit record to this OTLP/HTTP logs endpoint
    /// (such as https://collector:4318/v1/logs), at least once.
    #[arg(long, value_name = "URL")]
    otlp_logs: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let database = a.database.or_else(|| {
        std::env::var("SBX_SERVER_DATABASE")
            .ok()
            .filter(|d| !d.is_empty())
    });
    let where_ = match &database {
        Some(_) => "data in PostgreSQL".to_string(),
        None => format!("data in {}", a.data.display()),
    };
    // Before the runtime: PostgreSQL's client blocks.
    let opened = sbx_server::open(sbx_server::Config {
        data: a.data.clone(),
        database,
        database_ca: a.database_ca,
        bundle_ttl: Duration::from_secs(a.bundle_ttl_hours * 3600),
        public_url: a.public_url.unwrap_or_else(|| format!("http://{addr}")),
        per_token_per_minute: a.per_token_per_minute,
        refusal_burst: sbx_server::RefusalBurst {
            count: a.refusal_alert_count,
            window: Duration::from_secs(a.refusal_alert_minutes * 60),
        },
        siem: sbx_server::siem::Siem {
            syslog: a.syslog,
            syslog_ca: a.syslog_ca,
            otlp: a.otlp_logs,
        },
    })?;
    if let Some(token) = &opened.setup_token {
        println!("setup token (use it once, with POST /api/v1/setup): {token}");
    }
    println!("sbx-server listening on http://{addr}, {where_}");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            sbx_server::serve(opened.state, listener).await
        })?;
    Ok(())
}
