//! Alerts: what a security team must hear about at once, raised as the
//! records arrive: an exfiltration attempt (a secret's placeholder sent
//! where policy does not allow it), a tool rug pull (an MCP tool that
//! changed under its pin), a machine's log that fails its chain (edited,
//! rewritten, or with a gap), and a burst of refusals by one person; and,
//! by the delivery worker's clock, a machine silent past its policy
//! bundle's expiry. Each alert is kept, listed on the dashboard until
//! someone acknowledges it, and delivered to every webhook (`deliver.rs`).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin_log;
use crate::auth::{self, Caller, Role};
use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::AppState;

/// What an alert is about, from a shipped record; None for records that
/// raise none.
pub fn kind_of(r: &sbx_audit::Record) -> Option<&'static str> {
    match r.event.action.as_str() {
        "exfiltration" => Some("exfiltration"),
        "tool_changed" => Some("rug-pull"),
        _ => None,
    }
}

/// "N refusals by one person in M minutes" (`count` 0: never).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalBurst {
    pub count: u32,
    pub window: Duration,
}

impl Default for RefusalBurst {
    /// 20 in 10 minutes: more than a person's typos, less than an agent
    /// probing what it may reach.
    fn default() -> Self {
        RefusalBurst {
            count: 20,
            window: Duration::from_secs(600),
        }
    }
}

/// Raises a `refusals` alert when the person `at` names has been refused
/// `rule.count` times within `rule.window` (by the server's clock of
/// arrival), once per window. `at` is the latest refusal.
pub fn check_refusals(
    c: &mut Tx<'_>,
    rule: &RefusalBurst,
    at: &Origin<'_>,
) -> Result<bool, ApiError> {
    if rule.count == 0 {
        return Ok(false);
    }
    let since = db::now() - rule.window.as_secs() as i64;
    let n: i64 = c.query_one(
        "SELECT COUNT(*) FROM audit_records
         WHERE user_id = ?1 AND received >= ?2 AND decision IS NOT NULL AND decision <> 'allow'",
        params![at.user_id, since],
        |r| r.get(0),
    )?;
    if n < i64::from(rule.count) {
        return Ok(false);
    }
    let raised: Option<i64> = c.query_opt(
        "SELECT id FROM alerts WHERE kind = 'refusals' AND user_id = ?1 AND at >= ?2 LIMIT 1",
        params![at.user_id, since],
        |r| r.get(0),
    )?;
    if raised.is_some() {
        return Ok(false);
    }
    let email: String = c.query_one(
        "SELECT email FROM users WHERE id = ?1",
        params![at.user_id],
        |r| r.get(0),
    )?;
    let minutes = rule.window.as_secs().div_ceil(60);
    raise(
        c,
        "refusals",
        at,
        &format!("{n} refusals for {email} in the last {minutes} minutes (the alert is at {}): an agent probing what it may reach?", rule.count),
    )?;
    Ok(true)
}

/// Raises a `silent` alert for each machine whose last request is older
/// than `ttl` (the life of the policy bundles it was given), once per
/// silence: the alert's `seq` is the time the machine was last heard from.
pub fn check_silent(c: &mut Tx<'_>, ttl: Duration) -> Result<(), ApiError> {
    // Instances sharing a database must not raise one silence twice.
    c.serialize("silent machines")?;
    let before = db::now() - ttl.as_secs() as i64;
    let silent = c.query_map(
        "SELECT t.machine, MAX(t.last_used), MIN(t.user_id) FROM tokens t
         WHERE t.kind = 'machine' AND t.revoked IS NULL AND t.machine IS NOT NULL
           AND t.last_used IS NOT NULL
         GROUP BY t.machine HAVING MAX(t.last_used) < ?1",
        params![before],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?)),
    )?;
    for (machine, last, user_id) in silent {
        let known: Option<i64> = c.query_opt(
            "SELECT id FROM alerts WHERE kind = 'silent' AND machine = ?1 AND seq = ?2 LIMIT 1",
            params![machine, last],
            |r| r.get(0),
        )?;
        if known.is_some() {
            continue;
        }
        let (email, team_id): (String, Option<i64>) = c.query_one(
            "SELECT email, team_id FROM users WHERE id = ?1",
            params![user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let at = Origin {
            machine: &machine,
            session: "",
            seq: last as u64,
            user_id,
            team_id,
        };
        let summary = format!(
            "machine {machine} ({email}) has not reached the server since {}, and the policy it holds has expired: sbx there may be stopped, cut off from the server, or removed",
            crate::web::when(last)
        );
        raise(c, "silent", &at, &summary)?;
    }
    Ok(())
}

/// Where an alert comes from.
pub struct Origin<'a> {
    pub machine: &'a str,
    pub session: &'a str,
    pub seq: u64,
    pub user_id: i64,
    pub team_id: Option<i64>,
}

/// Keeps an alert and queues it for every webhook. The caller wakes the
/// delivery worker once its transaction is committed.
pub fn raise(c: &mut Tx<'_>, kind: &str, at: &Origin<'_>, summary: &str) -> Result<(), ApiError> {
    tracing::warn!(
        kind,
        machine = at.machine,
        session = at.session,
        seq = at.seq,
        "alert: {summary}"
    );
    let id: i64 = c.query_one(
        "INSERT INTO alerts (at, kind, machine, session, seq, user_id, team_id, summary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        params![
            db::now(),
            kind,
            at.machine,
            at.session,
            at.seq as i64,
            at.user_id,
            at.team_id,
            summary
        ],
        |r| r.get(0),
    )?;
    c.execute(
        "INSERT INTO deliveries (alert_id, webhook_id, attempts, next_at)
         SELECT ?1, id, 0, ?2 FROM webhooks WHERE removed IS NULL",
        params![id, db::now()],
    )?;
    Ok(())
}

/// What an alert says about itself, for people and for webhooks.
pub fn describe(r: &sbx_audit::Record) -> String {
    let e = &r.event;
    let mut s = format!("{} {}", e.action, e.resource);
    if let Some(reason) = &e.reason {
        s.push_str(": ");
        s.push_str(reason);
    }
    s
}

/// Alerts as the API and the dashboard show them: newest first, at most
/// 500, the ones `caller` may see (team admins and members: their team's).
pub fn list(c: &mut Tx<'_>, caller: &Caller) -> Result<Vec<Value>, ApiError> {
    let all = matches!(caller.role, Role::OrgAdmin | Role::Auditor);
    let rows = c.query_map(
        "SELECT a.id, a.at, a.kind, a.machine, a.session, a.seq, u.email, t.name, a.summary, a.team_id,
                ack.email, a.acked_at,
                (SELECT COUNT(*) FROM deliveries d WHERE d.alert_id = a.id AND d.delivered_at IS NOT NULL),
                (SELECT COUNT(*) FROM deliveries d WHERE d.alert_id = a.id)
         FROM alerts a LEFT JOIN users u ON u.id = a.user_id LEFT JOIN teams t ON t.id = a.team_id
         LEFT JOIN users ack ON ack.id = a.acked_by
         ORDER BY a.id DESC LIMIT 500",
        params![],
        |r| {
            Ok((
                r.get::<Option<i64>>(9)?,
                json!({
                    "id": r.get::<i64>(0)?, "at": r.get::<i64>(1)?, "kind": r.get::<String>(2)?,
                    "machine": r.get::<String>(3)?, "session": r.get::<String>(4)?, "seq": r.get::<i64>(5)?,
                    "user": r.get::<Option<String>>(6)?, "team": r.get::<Option<String>>(7)?,
                    "summary": r.get::<String>(8)?, "acked_by": r.get::<Option<String>>(10)?,
                    "acked_at": r.get::<Option<i64>>(11)?,
                    "delivered": r.get::<i64>(12)?, "webhooks": r.get::<i64>(13)?,
                }),
            ))
        },
    )?;
    Ok(rows
        .into_iter()
        .filter(|(team, _)| all || (caller.team_id.is_some() && *team == caller.team_id))
        .map(|(_, v)| v)
        .collect())
}

/// Marks alert `id` seen by `caller` (org admins; team admins their team's).
pub fn acknowledge(c: &mut Tx<'_>, caller: &Caller, id: i64) -> Result<(), ApiError> {
    let team: Option<Option<i64>> = c.query_opt(
        "SELECT team_id FROM alerts WHERE id = ?1",
        params![id],
        |r| r.get(0),
    )?;
    let Some(team) = team else {
        return Err(ApiError::NotFound(format!("no alert {id}")));
    };
    let own = caller.role == Role::TeamAdmin && team.is_some() && team == caller.team_id;
    if caller.role != Role::OrgAdmin && !own {
        return Err(ApiError::Forbidden(format!(
            "{} ({}) may not acknowledge alert {id}: org admins and its team's admins may",
            caller.email,
            caller.role.as_str()
        )));
    }
    c.execute(
        "UPDATE alerts SET acked_by = ?1, acked_at = ?2 WHERE id = ?3 AND acked_at IS NULL",
        params![caller.user_id, db::now(), id],
    )?;
    admin_log::record(
        c,
        Some(caller.user_id),
        "acknowledge_alert",
        &id.to_string(),
        json!({}),
    )
}

/// `GET /api/v1/alerts`.
pub async fn get_alerts(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("read alerts")?;
    let v = s.db.run(move |c| list(c, &caller)).await?;
    Ok(Json(json!(v)))
}

/// `POST /api/v1/alerts/{id}/ack`.
pub async fn ack(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("acknowledge alerts")?;
    s.db.run(move |c| acknowledge(c, &caller, id)).await?;
    Ok(Json(json!({ "acknowledged": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    url: String,
    /// `json` (a signed body of sbx's own) or `slack` (Slack's incoming
    /// webhook body).
    format: Option<String>,
}

/// `POST /api/v1/webhooks` (org admins): where alerts go. The answer holds
/// the secret the `json` bodies are signed with (`X-Sbx-Signature`), once.
pub async fn add_webhook(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<NewWebhook>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("add webhooks")?;
    caller.require(&[Role::OrgAdmin], "add webhooks")?;
    let format = req.format.unwrap_or_else(|| "json".into());
    if !matches!(format.as_str(), "json" | "slack") {
        return Err(ApiError::BadRequest(format!(
            "format `{format}`: use json or slack"
        )));
    }
    let url = reqwest::Url::parse(&req.url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| ApiError::BadRequest(format!("`{}` is not an http(s) URL", req.url)))?;
    let secret = auth::new_token("sbxh_")?;
    let (u, f, sec) = (url.to_string(), format.clone(), secret.clone());
    let id = s
        .db
        .run(move |c| {
            let id: i64 = c.query_one(
                "INSERT INTO webhooks (url, format, secret, created) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![u, f, sec, db::now()],
                |r| r.get(0),
            )?;
            admin_log::record(c, Some(caller.user_id), "add_webhook", &u, json!({ "format": f }))?;
            Ok(id)
        })
        .await?;
    Ok(Json(
        json!({ "id": id, "url": url.to_string(), "format": format, "secret": secret }),
    ))
}

/// `GET /api/v1/webhooks` (org admins, auditors): each with what it was
/// sent and how that went.
pub async fn list_webhooks(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "list webhooks")?;
    let v = s
        .db
        .run(|c| {
            c.query_map(
                "SELECT w.id, w.url, w.format, w.created,
                        (SELECT COUNT(*) FROM deliveries d WHERE d.webhook_id = w.id AND d.delivered_at IS NOT NULL),
                        (SELECT COUNT(*) FROM deliveries d WHERE d.webhook_id = w.id AND d.delivered_at IS NULL),
                        (SELECT COUNT(*) FROM delivery_attempts x JOIN deliveries d ON d.id = x.delivery_id WHERE d.webhook_id = w.id)
                 FROM webhooks w WHERE w.removed IS NULL ORDER BY w.id",
                params![],
                |r| {
                    Ok(json!({ "id": r.get::<i64>(0)?, "url": r.get::<String>(1)?, "format": r.get::<String>(2)?,
                               "created": r.get::<i64>(3)?, "delivered": r.get::<i64>(4)?,
                               "pending": r.get::<i64>(5)?, "attempts": r.get::<i64>(6)? }))
                },
            )
        })
        .await?;
    Ok(Json(json!(v)))
}

/// `DELETE /api/v1/webhooks/{id}` (org admins).
pub async fn remove_webhook(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("remove webhooks")?;
    caller.require(&[Role::OrgAdmin], "remove webhooks")?;
    s.db.run(move |c| {
        let done = c.execute(
            "UPDATE webhooks SET removed = ?1 WHERE id = ?2 AND removed IS NULL",
            params![db::now(), id],
        )?;
        if done == 0 {
            return Err(ApiError::NotFound(format!("no webhook {id}")));
        }
        admin_log::record(
            c,
            Some(caller.user_id),
            "remove_webhook",
            &id.to_string(),
            json!({}),
        )
    })
    .await?;
    Ok(Json(json!({ "removed": id })))
}
