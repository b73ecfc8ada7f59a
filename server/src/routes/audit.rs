//! Every machine's audit records, collected. A machine ships each session's
//! log from where the server's head for it stands; the server checks each
//! record's hash and its place in the chain against what it holds, drops
//! what it has already (the same record shipped twice), and flags what does
//! not fit: a record that differs from the one it holds (an edit), a chain
//! that does not continue from its head (a rewrite or a truncation), and
//! records that never arrived (a gap). Flags name the machine, the session
//! and the record.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::alerts;
use crate::auth::{Caller, Role};
use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::rollup;
use crate::AppState;

/// The server's head for one session of one machine: `(seq, hash)`.
fn head(c: &mut Tx<'_>, machine: &str, session: &str) -> Result<(u64, String), ApiError> {
    Ok(c.query_opt(
        "SELECT seq, hash FROM audit_heads WHERE machine = ?1 AND session = ?2",
        params![machine, session],
        |r| Ok((r.get::<i64>(0)? as u64, r.get(1)?)),
    )?
    .unwrap_or((0, sbx_audit::GENESIS.to_string())))
}

/// Flags a log that fails its chain, and raises the alert for it.
fn flag(
    c: &mut Tx<'_>,
    caller: &Caller,
    machine: &str,
    session: &str,
    seq: u64,
    kind: &str,
    details: Value,
) -> Result<(), ApiError> {
    tracing::warn!(machine, session, seq, kind, "audit log flagged");
    c.execute(
        "INSERT INTO audit_flags (at, machine, session, seq, kind, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![db::now(), machine, session, seq as i64, kind, details.to_string()],
    )?;
    let why = details["why"].as_str().unwrap_or(kind);
    alerts::raise(
        c,
        "log-tampered",
        &origin(caller, machine, session, seq),
        &format!("{kind}: {why}"),
    )
}

fn origin<'a>(caller: &Caller, machine: &'a str, session: &'a str, seq: u64) -> alerts::Origin<'a> {
    alerts::Origin {
        machine,
        session,
        seq,
        user_id: caller.user_id,
        team_id: caller.team_id,
    }
}

/// `POST /api/v1/audit` (machine tokens): records as JSON lines, in order.
pub async fn ingest(
    State(s): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let Some(machine) = caller.machine.clone() else {
        return Err(ApiError::Forbidden(
            "records are shipped by a signed-in machine (`sbx login`), with its token".into(),
        ));
    };
    // A line that is not a record refuses the request; a record whose
    // content does not match its own hash is flagged as edited.
    let mut records = Vec::new();
    let mut edited = Vec::new();
    for (i, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match sbx_audit::check_line(line) {
            Ok(r) => records.push((r, line.to_string())),
            Err(why) => match serde_json::from_str::<sbx_audit::Record>(line) {
                Ok(r) => edited.push((r, why)),
                Err(_) => return Err(ApiError::BadRequest(format!("line {}: {why}", i + 1))),
            },
        }
    }
    let burst = s.config.refusal_burst;
    let done = s.db.run(move |tx| {
        let (mut accepted, mut duplicates, mut flagged, mut raised) = (0u64, 0u64, 0u64, 0u64);
        for (r, why) in &edited {
            flag(tx, &caller, &machine, &r.session, r.seq, "edited", json!({ "id": r.id, "why": why }))?;
            flagged += 1;
        }
        let mut heads: HashMap<String, (u64, String)> = HashMap::new();
        let mut totals = rollup::Batch::default();
        // Stored together after the loop: a round trip per 50 records, not
        // two per record (what PostgreSQL over a network feels).
        let mut rows: Vec<Vec<db::Value>> = Vec::new();
        let mut taken: HashMap<(String, u64), String> = HashMap::new();
        let mut last_refused: Option<(String, u64)> = None;
        for (r, line) in records {
            let session = r.session.clone();
            let (seq, hash) = match heads.get(&session) {
                Some(h) => h.clone(),
                None => head(tx, &machine, &session)?,
            };
            if r.seq <= seq {
                let held: Option<String> = match taken.get(&(session.clone(), r.seq)) {
                    Some(h) => Some(h.clone()),
                    None => tx.query_opt(
                        "SELECT hash FROM audit_records WHERE machine = ?1 AND session = ?2 AND seq = ?3",
                        params![machine, session, r.seq as i64],
                        |x| x.get(0),
                    )?,
                };
                match held {
                    Some(h) if h == r.hash => duplicates += 1,
                    held => {
                        flag(tx, &caller, &machine, &session, r.seq, "edited", json!({
                            "id": r.id, "held": held, "shipped": r.hash,
                            "why": "the machine's log now holds a different record at this place",
                        }))?;
                        flagged += 1;
                    }
                }
                continue;
            }
            if r.seq > seq + 1 {
                flag(tx, &caller, &machine, &session, seq + 1, "gap", json!({
                    "missing": [seq + 1, r.seq - 1],
                    "why": "records between the server's head and this one never arrived: deleted from the machine's log?",
                }))?;
                flagged += 1;
            } else if r.prev != hash {
                flag(tx, &caller, &machine, &session, r.seq, "rewritten", json!({
                    "id": r.id, "expected_prev": hash, "prev": r.prev,
                    "why": "the chain does not continue from the record the server holds: the log was rewritten or truncated",
                }))?;
                flagged += 1;
            }
            use db::Param;
            rows.push(vec![
                machine.value(), session.value(), (r.seq as i64).value(), r.id.value(),
                r.hash.value(), r.ts.value(), caller.user_id.value(), caller.team_id.value(),
                r.event.surface.value(), r.event.action.value(), r.event.decision.value(),
                line.value(), db::now().value(),
            ]);
            taken.insert((session.clone(), r.seq), r.hash.clone());
            if let Some(kind) = alerts::kind_of(&r) {
                alerts::raise(tx, kind, &origin(&caller, &machine, &session, r.seq), &alerts::describe(&r))?;
                raised += 1;
            }
            if r.event.decision.as_deref().is_some_and(|d| d != "allow") {
                last_refused = Some((session.clone(), r.seq));
            }
            totals.add(&r);
            heads.insert(session, (r.seq, r.hash.clone()));
            accepted += 1;
        }
        for chunk in rows.chunks(50) {
            insert_records(tx, chunk)?;
        }
        if let Some((session, seq)) = last_refused {
            if alerts::check_refusals(tx, &burst, &origin(&caller, &machine, &session, seq))? {
                raised += 1;
            }
        }
        for (session, (seq, hash)) in &heads {
            tx.execute(
                "INSERT INTO audit_heads (machine, session, seq, hash) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(machine, session) DO UPDATE SET seq = ?3, hash = ?4",
                params![machine, session, *seq as i64, hash],
            )?;
        }
        totals.store(tx, &machine, caller.user_id, caller.team_id)?;
        let heads: HashMap<String, u64> = heads.into_iter().map(|(k, (s, _))| (k, s)).collect();
        let reply = json!({ "accepted": accepted, "duplicates": duplicates, "flagged": flagged,
                            "alerts": raised, "heads": heads });
        Ok((reply, raised + flagged > 0))
    })
    .await?;
    let (reply, wake) = done;
    if wake {
        s.alerts.notify_one();
    }
    s.records.notify_one();
    Ok(Json(reply))
}

/// Stores records (each row the 13 columns below, in order) in one
/// statement.
fn insert_records(c: &mut Tx<'_>, rows: &[Vec<db::Value>]) -> Result<(), ApiError> {
    let mut sql = String::from(
        "INSERT INTO audit_records (machine, session, seq, record_id, hash, ts, user_id, team_id,
         surface, action, decision, line, received) VALUES ",
    );
    let mut params: Vec<&dyn db::Param> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                sql.push_str(", ");
            }
            params.push(v);
            sql.push_str(&format!("?{}", params.len()));
        }
        sql.push(')');
    }
    c.execute(&sql, &params)?;
    Ok(())
}

/// `GET /api/v1/audit/heads` (machine tokens): where each of the machine's
/// sessions stands on the server, to ship from there.
pub async fn heads(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let Some(machine) = caller.machine.clone() else {
        return Err(ApiError::Forbidden(
            "heads are a signed-in machine's".into(),
        ));
    };
    s.db.run(move |c| {
        let m: serde_json::Map<String, Value> = c
            .query_map(
                "SELECT session, seq FROM audit_heads WHERE machine = ?1",
                params![machine],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )?
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect();
        Ok(Json(Value::Object(m)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    user: Option<String>,
    team: Option<String>,
    machine: Option<String>,
    session: Option<String>,
    surface: Option<String>,
    decision: Option<String>,
    action: Option<String>,
    /// RFC 3339 bounds on the record's time.
    since: Option<String>,
    until: Option<String>,
    /// The cursor from `X-Next-Cursor`: records after it.
    after: Option<i64>,
    limit: Option<u32>,
}

/// `GET /api/v1/audit`: records as JSON lines, filtered, in the order the
/// server received them, at most `limit` (default 1000) a page;
/// `X-Next-Cursor` says where the next page starts. Org admins and
/// auditors see everything, team admins their team's, members their own.
pub async fn query(
    State(s): State<AppState>,
    caller: Caller,
    Query(f): Query<Filter>,
) -> Result<Response, ApiError> {
    caller.require_person("read the audit trail")?;
    let limit = f.limit.unwrap_or(1000).clamp(1, 10_000) as i64;
    let (lines, next) =
        s.db.run(move |c| {
            let mut sql = String::from(
                "SELECT a.id, a.line FROM audit_records a JOIN users u ON u.id = a.user_id
                 LEFT JOIN teams t ON t.id = a.team_id WHERE a.id > ?1",
            );
            let mut args: Vec<Box<dyn db::Param + Send>> = vec![Box::new(f.after.unwrap_or(0))];
            let mut add = |cond: &str,
                           v: Box<dyn db::Param + Send>,
                           args: &mut Vec<Box<dyn db::Param + Send>>| {
                args.push(v);
                sql.push_str(&format!(" AND {cond} ?{}", args.len()));
            };
            let (scope, who) = caller.audit_scope();
            add(scope, Box::new(who), &mut args);
            if let Some(v) = f.user {
                add("u.email =", Box::new(v), &mut args)
            }
            if let Some(v) = f.team {
                add("t.name =", Box::new(v), &mut args)
            }
            if let Some(v) = f.machine {
                add("a.machine =", Box::new(v), &mut args)
            }
            if let Some(v) = f.session {
                add("a.session =", Box::new(v), &mut args)
            }
            if let Some(v) = f.surface {
                add("a.surface =", Box::new(v), &mut args)
            }
            if let Some(v) = f.decision {
                add("a.decision =", Box::new(v), &mut args)
            }
            if let Some(v) = f.action {
                add("a.action =", Box::new(v), &mut args)
            }
            if let Some(v) = f.since {
                add("a.ts >=", Box::new(v), &mut args)
            }
            if let Some(v) = f.until {
                add("a.ts <", Box::new(v), &mut args)
            }
            sql.push_str(&format!(" ORDER BY a.id LIMIT {limit}"));
            let refs: Vec<&dyn db::Param> =
                args.iter().map(|b| b.as_ref() as &dyn db::Param).collect();
            let rows: Vec<(i64, String)> =
                c.query_map(&sql, &refs, |r| Ok((r.get(0)?, r.get(1)?)))?;
            let next = (rows.len() as i64 == limit)
                .then(|| rows.last().map(|r| r.0))
                .flatten();
            let mut out = String::new();
            for (_, line) in rows {
                out.push_str(&line);
                out.push('\n');
            }
            Ok((out, next))
        })
        .await?;
    let mut r = Response::builder().header(header::CONTENT_TYPE, "application/x-ndjson");
    if let Some(n) = next {
        r = r.header("X-Next-Cursor", n.to_string());
    }
    r.body(Body::from(lines))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `GET /api/v1/audit/flags` (org admins, auditors): every edit, rewrite
/// and gap found, newest first.
pub async fn flags(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "read the audit flags")?;
    s.db.run(|c| {
        let v: Vec<Value> = c.query_map(
            "SELECT at, machine, session, seq, kind, details FROM audit_flags ORDER BY id DESC",
            params![],
            |r| {
                Ok(json!({ "at": r.get::<i64>(0)?, "machine": r.get::<String>(1)?,
                    "session": r.get::<String>(2)?, "seq": r.get::<i64>(3)?, "kind": r.get::<String>(4)?,
                    "details": serde_json::from_str::<Value>(&r.get::<String>(5)?).unwrap_or(Value::Null) }))
            },
        )?;
        Ok(Json(json!(v)))
    })
    .await
}

/// `GET /api/v1/siem` (org admins and auditors): each SIEM sink's
/// deliveries, what it has still to take, its last success and error.
pub async fn siem_status(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "read SIEM delivery")?;
    let siem = s.config.siem.clone();
    Ok(Json(
        s.db.run(move |c| crate::siem::status(c, &siem)).await?,
    ))
}
