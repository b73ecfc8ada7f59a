//! The server's own audit trail: every administrative action (setup,
//! people, tokens, sign-ins, policy pushes) is an audit record in a chain
//! of its own, in the same format as a session's log. The server checks the
//! chain whenever it is read, and `sbx audit verify` checks an export, so a
//! row edited or deleted in the database is found and named.

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};

use crate::auth::{Caller, Role};
use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::AppState;

/// The chain's name, its records' `session`.
pub const CHAIN: &str = "sbx-server-admin";

/// Appends one action: who (`actor`, a user id; None before anyone is
/// signed in), what, to what.
pub fn record(
    c: &mut Tx<'_>,
    actor: Option<i64>,
    action: &str,
    target: &str,
    details: Value,
) -> Result<(), ApiError> {
    // The next link depends on the last: instances take turns.
    c.serialize(CHAIN)?;
    let user = match actor {
        Some(id) => c
            .query_opt("SELECT email FROM users WHERE id = ?1", params![id], |r| {
                r.get(0)
            })?
            .unwrap_or_else(|| format!("user:{id}")),
        None => "anonymous".to_string(),
    };
    let (seq, prev) = c
        .query_opt(
            "SELECT seq, hash FROM admin_log WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
            params![],
            |r| Ok((r.get::<i64>(0)? as u64, r.get::<String>(1)?)),
        )?
        .unwrap_or((0, sbx_audit::GENESIS.to_string()));
    let identity = sbx_audit::Identity {
        session: CHAIN.to_string(),
        user,
        host: host().to_string(),
    };
    let event = sbx_audit::Event {
        action: action.to_string(),
        resource: target.to_string(),
        details: details.clone(),
        ..sbx_audit::Event::default()
    };
    let (r, line) = sbx_audit::chained((seq, &prev), &identity, sbx_audit::Category::Admin, event);
    c.execute(
        "INSERT INTO admin_log (at, actor, action, target, details, seq, line, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            db::now(),
            actor,
            action,
            target,
            details.to_string(),
            r.seq as i64,
            line,
            r.hash
        ],
    )?;
    Ok(())
}

/// This instance's host name, stamped on the records it writes.
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| sbx_audit::Identity::current(CHAIN).host)
}

fn lines(c: &mut Tx<'_>) -> Result<String, ApiError> {
    let rows = c.query_map(
        "SELECT line FROM admin_log WHERE seq IS NOT NULL ORDER BY seq",
        params![],
        |r| r.get::<String>(0),
    )?;
    let mut out = String::new();
    for l in rows {
        out.push_str(&l);
        out.push('\n');
    }
    Ok(out)
}

/// `GET /api/v1/admin-log` (org admins, auditors): the chain as JSON lines,
/// for `sbx audit verify` or a SIEM.
pub async fn export(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "read the admin log")?;
    let text = s.db.run(lines).await?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from(text))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `GET /api/v1/admin-log/verify` (org admins, auditors): whether the chain
/// is intact, and if not, the first record that is not as written.
pub async fn verify(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "verify the admin log")?;
    let text = s.db.run(lines).await?;
    Ok(Json(match sbx_audit::verify_lines(&text) {
        Ok(v) => json!({ "intact": true, "records": v.records, "head": v.head }),
        Err(p) => json!({
            "intact": false,
            "problem": p.to_string(),
            "seq": p.seq,
            "id": p.id,
        }),
    }))
}
