//! The dashboard with a large audit trail: time to first byte of each page
//! with 1,000,000 records in the database (2,000 sessions of 500 records
//! over 30 days, one in ten refused), on SQLite or (`--postgres`)
//! PostgreSQL. Target: under 300 ms for every page.
//!
//! The records are shipped through the API as machines ship them (chained,
//! each checked, the dashboard's running totals kept); the shipping rate is
//! printed too.

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

mod local_server;
mod stats;

#[derive(Parser)]
#[command(about = "Dashboard pages' time to first byte with a large audit trail")]
struct Args {
    /// Audit records in the database.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Records per session.
    #[arg(long, default_value_t = 500)]
    per_session: usize,
    /// Requests per page.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// PostgreSQL (a server of the bench's own) instead of SQLite.
    #[arg(long)]
    postgres: bool,
}

const SURFACES: [&str; 5] = ["net", "fs", "credential", "mcp", "exec"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let server = local_server::start(dir.path(), args.postgres, Duration::from_secs(3600))?;
    let (url, setup, kind) = (server.url.clone(), server.setup.clone(), server.kind);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let admin: Value = c
        .post(format!("{url}/api/v1/setup"))
        .json(&json!({"setup_token": setup, "email": "root@acme.example"}))
        .send()?
        .error_for_status()?
        .json()?;
    let admin = admin["token"].as_str().unwrap_or_default().to_string();
    c.post(format!("{url}/api/v1/teams"))
        .bearer_auth(&admin)
        .json(&json!({"name": "web"}))
        .send()?
        .error_for_status()?;
    c.put(format!("{url}/api/v1/policy/org"))
        .bearer_auth(&admin)
        .body("layer = \"org\"\n\n[[network]]\nid = \"no-paste\"\naction = \"deny\"\nto = [\"paste.test\"]\n")
        .send()?
        .error_for_status()?;

    println!(
        "database: {kind}; shipping {} records ({} sessions)...",
        args.records,
        args.records.div_ceil(args.per_session)
    );
    let started = Instant::now();
    let last = fill(&c, &url, &admin, args.records, args.per_session)?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "shipped in {took:.1} s ({:.0} records/s, rollups included)",
        args.records as f64 / took
    );

    let r = c
        .post(format!("{url}/ui/signin"))
        .form(&[("token", admin.as_str())])
        .send()?;
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| anyhow::anyhow!("no cookie from sign-in"))?
        .to_string();
    let pages = [
        "/ui/overview?days=1",
        "/ui/overview?days=7",
        "/ui/overview?days=30",
        "/ui/sessions",
        last.as_str(),
        "/ui/alerts",
        "/ui/policy/org",
    ];
    println!(
        "{:<34} {:>9} {:>9} {:>9}  (target 300 ms)",
        "page", "p50 ms", "p95 ms", "max ms"
    );
    let mut worst: f64 = 0.0;
    for page in pages {
        let mut ms = Vec::new();
        for _ in 0..args.requests {
            let t = Instant::now();
            // `send` returns with the status and headers: the first byte.
            let r = c
                .get(format!("{url}{page}"))
                .header("cookie", &cookie)
                .send()?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(r.status().is_success(), "{page}: {}", r.status());
            let _ = r.bytes()?;
        }
        let p95 = stats::percentile(&ms, 95.0).unwrap_or(0.0);
        worst = worst.max(p95);
        println!(
            "{page:<34} {:>9} {:>9} {:>9}",
            stats::cell(&ms, 50.0),
            stats::cell(&ms, 95.0),
            stats::cell(&ms, 100.0)
        );
    }
    println!(
        "slowest page at p95: {worst:.1} ms, {:.2}x the 300 ms target",
        worst / 300.0
    );
    Ok(())
}

/// Ships `n` records through the API as 10 machines would: sessions of
/// `per` records, spread over the last 30 days, each chained; returns the
/// last session's path on the dashboard.
fn fill(
    c: &reqwest::blocking::Client,
    url: &str,
    admin: &str,
    n: usize,
    per: usize,
) -> anyhow::Result<String> {
    let mut machines = Vec::new();
    for m in 0..10 {
        let code: Value = c
            .post(format!("{url}/api/v1/device/code"))
            .json(&json!({"machine": format!("machine-{m}")}))
            .send()?
            .error_for_status()?
            .json()?;
        c.post(format!("{url}/api/v1/device/approve"))
            .bearer_auth(admin)
            .json(&json!({"user_code": code["user_code"]}))
            .send()?
            .error_for_status()?;
        let t: Value = c
            .post(format!("{url}/api/v1/device/token"))
            .json(&json!({"device_code": code["device_code"]}))
            .send()?
            .error_for_status()?
            .json()?;
        machines.push(t["token"].as_str().unwrap_or_default().to_string());
    }
    let now = time::OffsetDateTime::now_utc();
    let sessions = n.div_ceil(per);
    let (mut written, mut last) = (0, String::new());
    for s in 0..sessions {
        let machine = format!("machine-{}", s % 10);
        let session = format!("s-{s}");
        let identity = sbx_audit::Identity {
            session: session.clone(),
            user: "bob@acme.example".into(),
            host: machine.clone(),
        };
        let start =
            now - time::Duration::seconds((30 * 86400) * (sessions - s) as i64 / sessions as i64);
        let mut prev = (0u64, sbx_audit::GENESIS.to_string());
        let mut body = String::new();
        for i in 0..per.min(n - written) {
            let surface = SURFACES[i % SURFACES.len()];
            let denied = i % 10 == 9;
            let event = sbx_audit::Event {
                surface: Some(surface.into()),
                action: "connect".into(),
                resource: format!("host-{}.example:443", i % 37),
                decision: Some(if denied { "deny" } else { "allow" }.into()),
                rule_id: Some("no-paste".into()),
                ..Default::default()
            };
            let ts = (start + time::Duration::seconds(i as i64))
                .format(&time::format_description::well_known::Rfc3339)?;
            let (r, line) = sbx_audit::chained_at(
                (prev.0, &prev.1),
                &identity,
                sbx_audit::Category::Decision,
                event,
                ts,
            );
            body.push_str(&line);
            body.push('\n');
            prev = (r.seq, r.hash);
            written += 1;
        }
        c.post(format!("{url}/api/v1/audit"))
            .bearer_auth(&machines[s % 10])
            .body(body)
            .send()?
            .error_for_status()?;
        last = format!("/ui/sessions/{machine}/{session}");
    }
    Ok(last)
}
