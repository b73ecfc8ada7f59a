//! The control plane, on the loopback:
//! - policy fetch, as a machine pays for it at every session start: `GET
//!   /api/v1/policy` answered in full (two bundles signed fresh), answered
//!   `304 Not Modified` to a conditional request, and the whole refresh
//!   `sbx start` runs (reading the sign-in, the request, the answer kept).
//!   Target: under 5 ms at the median;
//! - audit ingestion: records shipped from a session's log (`sbx audit
//!   ship`: 500 a request, each hash and chain link checked and stored)
//!   per second, on SQLite. Target: 50,000 a second.

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

mod local_server;
mod stats;

#[derive(Parser)]
#[command(about = "Policy fetch latency from sbx-server on the loopback")]
struct Args {
    /// Fetches per measurement.
    #[arg(long, default_value_t = 500)]
    fetches: usize,
    /// Audit records to ship.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Keep the server's data in PostgreSQL (a server of the bench's own,
    /// from Debian's package) instead of SQLite.
    #[arg(long)]
    postgres: bool,
}

const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"no-pastebin\"\naction = \"deny\"\nto = [\"pastebin.com\"]\n";
const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"web-api\"\naction = \"allow\"\nto = [\"api.web.example\"]\nports = [443]\n";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    // The refresh reads and writes the sign-in under these.
    std::env::set_var("SBX_CONFIG_DIR", dir.path().join("config"));
    std::env::set_var("SBX_STATE_DIR", dir.path().join("state"));
    let server = local_server::start(dir.path(), args.postgres, Duration::from_secs(72 * 3600))?;
    println!("database: {}", server.kind);
    let (url, setup) = (server.url.clone(), server.setup.clone());

    let c = reqwest::blocking::Client::new();
    let call = |method: reqwest::Method,
                path: &str,
                token: Option<&str>,
                body: Value|
     -> anyhow::Result<Value> {
        let mut r = c.request(method, format!("{url}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r = match body {
            Value::String(s) => r.body(s),
            other => r.json(&other),
        };
        Ok(r.send()?.error_for_status()?.json()?)
    };
    use reqwest::Method;
    let admin = call(
        Method::POST,
        "/api/v1/setup",
        None,
        json!({"setup_token": setup, "email": "root@acme.example"}),
    )?;
    let admin = admin["token"].as_str().unwrap_or_default().to_string();
    call(
        Method::POST,
        "/api/v1/teams",
        Some(&admin),
        json!({"name": "web"}),
    )?;
    let bob = call(
        Method::POST,
        "/api/v1/users",
        Some(&admin),
        json!({"email": "bob@acme.example", "role": "member", "team": "web"}),
    )?;
    let bob = bob["token"].as_str().unwrap_or_default().to_string();
    call(
        Method::PUT,
        "/api/v1/policy/org",
        Some(&admin),
        Value::String(ORG.into()),
    )?;
    call(
        Method::PUT,
        "/api/v1/policy/teams/web",
        Some(&admin),
        Value::String(TEAM.into()),
    )?;

    // Sign this "machine" in as bob, as `sbx login` does.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let u = url.clone();
    let login = std::thread::spawn(move || {
        sandbox::managed::login(&u, "bench", |code, _| {
            let _ = tx.send(code.to_string());
        })
    });
    let code = rx.recv()?;
    call(
        Method::POST,
        "/api/v1/device/approve",
        Some(&bob),
        json!({"user_code": code}),
    )?;
    let login = login
        .join()
        .map_err(|_| anyhow::anyhow!("login panicked"))??;

    let measure = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<Vec<f64>> {
        for _ in 0..20 {
            f()?;
        }
        let mut v = Vec::with_capacity(args.fetches);
        for _ in 0..args.fetches {
            let t = Instant::now();
            f()?;
            v.push(ms(t.elapsed()));
        }
        Ok(v)
    };
    let full = measure(&mut || {
        let r = c
            .get(format!("{url}/api/v1/policy"))
            .bearer_auth(&login.token)
            .send()?;
        anyhow::ensure!(r.status() == 200);
        r.bytes()?;
        Ok(())
    })?;
    let etag = c
        .get(format!("{url}/api/v1/policy"))
        .bearer_auth(&login.token)
        .send()?
        .headers()["etag"]
        .to_str()?
        .to_string();
    let cached = measure(&mut || {
        let r = c
            .get(format!("{url}/api/v1/policy"))
            .bearer_auth(&login.token)
            .header("If-None-Match", &etag)
            .send()?;
        anyhow::ensure!(r.status() == 304, "{}", r.status());
        Ok(())
    })?;
    sandbox::managed::refresh()?;
    let refresh = measure(&mut || {
        let r = sandbox::managed::refresh()?;
        anyhow::ensure!(r == sandbox::managed::Refresh::Unchanged, "{r:?}");
        Ok(())
    })?;

    println!(
        "policy fetch from sbx-server on the loopback, {} fetches each",
        args.fetches
    );
    println!("{:<44} {:>8} {:>8} {:>8}", "", "p50 ms", "p90 ms", "p99 ms");
    for (name, v) in [
        ("GET /api/v1/policy, answered in full", &full),
        ("the same, conditional: 304", &cached),
        ("refresh at session start (sbx start's)", &refresh),
    ] {
        println!(
            "{name:<44} {:>8} {:>8} {:>8}",
            stats::cell(v, 50.0),
            stats::cell(v, 90.0),
            stats::cell(v, 99.0)
        );
    }
    let p50 = stats::percentile(&refresh, 50.0).unwrap_or(f64::MAX);
    println!(
        "session start's refresh at p50: {p50:.2} ms (target < 5 ms): {}",
        if p50 < 5.0 { "met" } else { "MISSED" }
    );

    // Ingestion: a session's log, shipped.
    let audit = dir.path().join("state/audit");
    std::fs::create_dir_all(&audit)?;
    let path = audit.join("bench.jsonl");
    let log = sbx_audit::AuditLog::open(
        &path,
        sbx_audit::Identity::current("bench"),
        Duration::from_secs(1),
    )?;
    for i in 0..args.records {
        let host = format!("host{}.example", i % 97);
        log.record(sbx_audit::Entry::file_changes(&host, json!({ "i": i })))?;
    }
    log.close()?;
    let t = Instant::now();
    let shipped = sandbox::managed::ship(&path, false)?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(shipped.accepted as usize == args.records, "{shipped:?}");
    let rate = args.records as f64 / secs;
    println!(
        "audit ingestion: {} records in {secs:.2} s: {rate:.0} records/s (target 50,000/s): {}",
        args.records,
        if rate >= 50_000.0 { "met" } else { "MISSED" }
    );
    Ok(())
}
