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
    /// Where the database and the organisation's signing key live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sbx-server")]
    data: PathBuf,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let opened = sbx_server::open(sbx_server::Config {
        data: a.data.clone(),
        bundle_ttl: Duration::from_secs(a.bundle_ttl_hours * 3600),
        public_url: a.public_url.unwrap_or_else(|| format!("http://{addr}")),
    })?;
    if let Some(token) = &opened.setup_token {
        println!("setup token (use it once, with POST /api/v1/setup): {token}");
    }
    println!(
        "sbx-server listening on http://{addr}, data in {}",
        a.data.display()
    );
    sbx_server::serve(opened.state, listener).await?;
    Ok(())
}
