//! Delivering alerts to webhooks, at least once: a worker wakes when an
//! alert is raised (and every second; now and then it also looks for
//! silent machines, `alerts::check_silent`), takes the deliveries that are due,
//! posts each, and records every attempt. A failed one is tried again
//! after 1, 2, 4... seconds, at most five minutes apart, until it gets a
//! 2xx. A delivery is leased while it is being sent, so instances sharing
//! one database do not send it twice at once.
//!
//! Bodies: `json` is sbx's own, signed with the webhook's secret
//! (`X-Sbx-Signature: sha256=<HMAC-SHA256 of the body>`) and carrying
//! `X-Sbx-Delivery`, the same on every attempt, so a receiver can drop a
//! repeat; `slack` is a Slack incoming webhook's `{"text": ...}`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::db::{self, params};
use crate::error::ApiError;
use crate::AppState;

/// How long a delivery stays leased to the instance sending it.
const LEASE: i64 = 30;
/// The longest wait between attempts.
const MAX_BACKOFF: i64 = 300;

struct Due {
    id: i64,
    url: String,
    format: String,
    secret: String,
    attempts: i64,
    alert: Value,
}

/// The worker; runs until the server stops.
pub async fn run(state: AppState) {
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("alerts will not be delivered: {e}");
            return;
        }
    };
    // Silent machines are looked for a few times per bundle lifetime.
    let ttl = state.config.bundle_ttl;
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut looked = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = state.alerts.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if looked.elapsed() >= every {
            looked = tokio::time::Instant::now();
            if let Err(e) = state
                .db
                .run(move |c| crate::alerts::check_silent(c, ttl))
                .await
            {
                tracing::warn!("cannot look for silent machines: {e}");
            }
        }
        let due = match state.db.run(take_due).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot read due deliveries: {e}");
                continue;
            }
        };
        for d in due {
            let outcome = send(&client, &state.config.public_url, &d).await;
            let (id, attempts) = (d.id, d.attempts);
            if let Err(e) = state
                .db
                .run(move |c| record(c, id, attempts, outcome))
                .await
            {
                tracing::warn!("cannot record delivery {id}: {e}");
            }
        }
    }
}

pub(crate) fn client() -> Result<reqwest::Client, String> {
    let tls = sbx_egress::mitm::upstream_config(&[]).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}

/// The deliveries due now, leased to this instance.
fn take_due(c: &mut db::Tx<'_>) -> Result<Vec<Due>, ApiError> {
    let now = db::now();
    let due = c.query_map(
        "SELECT d.id, w.url, w.format, w.secret, d.attempts,
                a.id, a.at, a.kind, a.machine, a.session, a.seq, u.email, t.name, a.summary
         FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id JOIN alerts a ON a.id = d.alert_id
         LEFT JOIN users u ON u.id = a.user_id LEFT JOIN teams t ON t.id = a.team_id
         WHERE d.delivered_at IS NULL AND d.next_at <= ?1 AND w.removed IS NULL
         ORDER BY d.id LIMIT 20",
        params![now],
        |r| {
            Ok(Due {
                id: r.get(0)?,
                url: r.get(1)?,
                format: r.get(2)?,
                secret: r.get(3)?,
                attempts: r.get(4)?,
                alert: json!({
                    "id": r.get::<i64>(5)?, "at": r.get::<i64>(6)?, "kind": r.get::<String>(7)?,
                    "machine": r.get::<String>(8)?, "session": r.get::<String>(9)?, "seq": r.get::<i64>(10)?,
                    "user": r.get::<Option<String>>(11)?, "team": r.get::<Option<String>>(12)?,
                    "summary": r.get::<String>(13)?,
                }),
            })
        },
    )?;
    let mut taken = Vec::new();
    for d in due {
        // Another instance may have taken it since the read.
        let leased = c.execute(
            "UPDATE deliveries SET next_at = ?1 WHERE id = ?2 AND next_at <= ?3 AND delivered_at IS NULL",
            params![now + LEASE, d.id, now],
        )?;
        if leased == 1 {
            taken.push(d);
        }
    }
    Ok(taken)
}

/// The body for `d`'s webhook, and its headers.
fn body(public_url: &str, d: &Due) -> (String, Vec<(&'static str, String)>) {
    let a = &d.alert;
    if d.format == "slack" {
        let text = format!(
            ":rotating_light: sbx alert: *{}* on `{}` (session `{}`, record {}) by {}: {}",
            a["kind"].as_str().unwrap_or(""),
            a["machine"].as_str().unwrap_or(""),
            a["session"].as_str().unwrap_or(""),
            a["seq"],
            a["user"].as_str().unwrap_or("?"),
            a["summary"].as_str().unwrap_or(""),
        );
        return (json!({ "text": text }).to_string(), Vec::new());
    }
    let body = json!({ "alert": a, "server": public_url }).to_string();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(d.secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body.as_bytes());
    let sig = crate::auth::hex(&mac.finalize().into_bytes());
    (
        body,
        vec![
            ("x-sbx-signature", format!("sha256={sig}")),
            ("x-sbx-delivery", d.id.to_string()),
        ],
    )
}

/// Posts one delivery: Ok with the status for a 2xx, Err with what
/// happened otherwise.
async fn send(
    client: &reqwest::Client,
    public_url: &str,
    d: &Due,
) -> Result<u16, (Option<u16>, String)> {
    let (body, headers) = body(public_url, d);
    let mut r = client
        .post(&d.url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        r = r.header(k, v);
    }
    match r.send().await {
        Ok(resp) if resp.status().is_success() => Ok(resp.status().as_u16()),
        Ok(resp) => Err((
            Some(resp.status().as_u16()),
            format!("answered {}", resp.status()),
        )),
        Err(e) => Err((None, e.to_string())),
    }
}

fn record(
    c: &mut db::Tx<'_>,
    id: i64,
    attempts: i64,
    outcome: Result<u16, (Option<u16>, String)>,
) -> Result<(), ApiError> {
    let now = db::now();
    let (status, error) = match &outcome {
        Ok(s) => (Some(i64::from(*s)), None),
        Err((s, e)) => (s.map(i64::from), Some(e.clone())),
    };
    c.execute(
        "INSERT INTO delivery_attempts (delivery_id, at, status, error) VALUES (?1, ?2, ?3, ?4)",
        params![id, now, status, error],
    )?;
    match outcome {
        Ok(_) => c.execute(
            "UPDATE deliveries SET attempts = ?1, delivered_at = ?2, last_status = ?3, last_error = NULL WHERE id = ?4",
            params![attempts + 1, now, status, id],
        )?,
        Err(_) => {
            let wait = (1i64 << attempts.clamp(0, 16)).min(MAX_BACKOFF);
            c.execute(
                "UPDATE deliveries SET attempts = ?1, next_at = ?2, last_status = ?3, last_error = ?4 WHERE id = ?5",
                params![attempts + 1, now + wait, status, error, id],
            )?
        }
    };
    Ok(())
}
