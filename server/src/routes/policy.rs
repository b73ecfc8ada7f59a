//! Org and team policy: pushed as text, checked by the same engine as
//! `sbx policy check` (errors name the line), kept as numbered versions,
//! and served to machines as bundles signed with the organisation's key
//! that expire (so a machine cut off from the server fails closed).
//!
//! The expiry is rounded up to a whole hour (or to the TTL, when shorter),
//! so the bundles a machine gets are the same for that long and a
//! conditional request (`If-None-Match`) answers `304 Not Modified`
//! without a body.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::admin_log;
use crate::auth::{Caller, Role};
use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::routes::identity::{self, signing_key};
use crate::AppState;

/// Checks `text` as a policy of `layer` (`org` or `team`): it must say so
/// itself (`layer = "..."`), so the file means the same wherever it is read.
/// A team policy is checked under `org`, the org policy's text, so an allow
/// the org does not delegate is refused here, at its line.
pub fn validate(text: &str, layer: &str, org: Option<&str>) -> Result<(), ApiError> {
    let declared = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("layer").and_then(|l| l.as_str().map(str::to_string)));
    if declared.is_some() && declared.as_deref() != Some(layer) {
        return Err(ApiError::Policy {
            line: text
                .lines()
                .position(|l| l.trim_start().starts_with("layer"))
                .map_or(1, |i| i + 1),
            message: format!(
                "this is a {layer} policy, but it says `layer = \"{}\"`",
                declared.unwrap_or_default()
            ),
        });
    }
    if declared.is_none() {
        return Err(ApiError::Policy {
            line: 1,
            message: format!(
                "a {layer} policy says which layer it is: add `layer = \"{layer}\"` at the top"
            ),
        });
    }
    let checked = (|| {
        let mut b = sbx_policy::PolicyBuilder::new();
        if let Some(org) = org {
            b.add_text("the org policy", org)?;
        }
        b.add_text("policy", text)?;
        b.build().map(drop)
    })();
    checked.map_err(|e| match e {
        sbx_policy::PolicyError::Invalid {
            file,
            line,
            column,
            message,
        } if file == "policy" => ApiError::Policy {
            line,
            message: format!("column {column}: {message}"),
        },
        other => ApiError::BadRequest(other.to_string()),
    })
}

fn store(
    tx: &mut Tx<'_>,
    scope: &str,
    team: Option<i64>,
    text: String,
    author: i64,
    target: &str,
) -> Result<i64, ApiError> {
    // Versions count up one at a time, also with several instances.
    tx.serialize(&format!("policy/{target}"))?;
    let version = latest(tx, scope, team)?.map_or(0, |(v, _)| v) + 1;
    let digest = crate::auth::hex(&Sha256::digest(text.as_bytes()));
    tx.execute(
        "INSERT INTO policies (scope, team_id, version, text, author, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![scope, team, version, text, author, db::now()],
    )?;
    admin_log::record(
        tx,
        Some(author),
        "push_policy",
        target,
        json!({ "version": version, "sha256": digest }),
    )?;
    Ok(version)
}

/// Refuses unless `caller` may push the org policy (`team` None) or that
/// team's: org admins push any, a team's admins their own.
pub(crate) fn may_push(caller: &Caller, team: Option<&str>) -> Result<(), ApiError> {
    caller.require_person("push policy")?;
    match team {
        None => caller.require(&[Role::OrgAdmin], "push the org policy"),
        Some(team) => {
            identity::check_name("team", team)?;
            let own_team = caller.role == Role::TeamAdmin && caller.team.as_deref() == Some(team);
            if caller.role == Role::OrgAdmin || own_team {
                Ok(())
            } else {
                Err(ApiError::Forbidden(format!(
                    "{} ({}) may not push team `{team}`'s policy: org admins and that team's admins may",
                    caller.email,
                    caller.role.as_str()
                )))
            }
        }
    }
}

/// A new version of the org policy (`team` None) or a team's, checked as
/// `sbx policy check` would (a team's under the org's delegation; the org's
/// against every team's current policy, which it must not strand); returns
/// its number. The caller was checked with [`may_push`].
pub(crate) fn push(
    c: &mut Tx<'_>,
    caller: &Caller,
    team: Option<&str>,
    body: String,
) -> Result<i64, ApiError> {
    let Some(team) = team else {
        validate(&body, "org", None)?;
        // What a new org policy stops delegating, the teams must stop
        // allowing first.
        for (team, version, text) in latest_teams(c)? {
            if let Err(e) = validate(&text, "team", Some(&body)) {
                return Err(ApiError::Conflict(format!(
                    "this org policy would refuse team `{team}`'s policy (version {version}): {e}; change that policy first"
                )));
            }
        }
        return store(c, "org", None, body, caller.user_id, "org");
    };
    let org = latest(c, "org", None)?.map(|(_, text)| text);
    validate(&body, "team", org.as_deref())?;
    let id: i64 = c
        .query_opt("SELECT id FROM teams WHERE name = ?1", params![team], |r| {
            r.get(0)
        })?
        .ok_or_else(|| ApiError::NotFound(format!("no team `{team}`")))?;
    store(
        c,
        "team",
        Some(id),
        body,
        caller.user_id,
        &format!("team/{team}"),
    )
}

/// `PUT /api/v1/policy/org` (org admins): a new version of the org policy.
pub async fn push_org(
    State(s): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    may_push(&caller, None)?;
    let version = s.db.run(move |c| push(c, &caller, None, body)).await?;
    Ok(Json(json!({ "scope": "org", "version": version })))
}

/// `PUT /api/v1/policy/teams/{team}` (org admins, and that team's admins).
pub async fn push_team(
    State(s): State<AppState>,
    caller: Caller,
    Path(team): Path<String>,
    body: String,
) -> Result<Json<Value>, ApiError> {
    may_push(&caller, Some(&team))?;
    let t = team.clone();
    let version = s.db.run(move |c| push(c, &caller, Some(&t), body)).await?;
    Ok(Json(
        json!({ "scope": "team", "team": team, "version": version }),
    ))
}

/// `GET /api/v1/policy/org` (org admins, auditors): the versions pushed.
pub async fn history_org(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::OrgAdmin, Role::Auditor], "read the policy history")?;
    s.db.run(|c| {
        let v: Vec<Value> = c.query_map(
            "SELECT p.version, u.email, p.created, p.text FROM policies p JOIN users u ON u.id = p.author
             WHERE p.scope = 'org' ORDER BY p.version DESC",
            params![],
            |r| {
                Ok(json!({ "version": r.get::<i64>(0)?, "author": r.get::<String>(1)?,
                           "created": r.get::<i64>(2)?, "text": r.get::<String>(3)? }))
            },
        )?;
        Ok(Json(json!(v)))
    })
    .await
}

/// Every team's newest policy: the team, the version, the text.
fn latest_teams(c: &mut Tx<'_>) -> Result<Vec<(String, i64, String)>, ApiError> {
    c.query_map(
        "SELECT t.name, p.version, p.text FROM policies p JOIN teams t ON t.id = p.team_id
         WHERE p.scope = 'team'
           AND p.version = (SELECT MAX(q.version) FROM policies q WHERE q.scope = 'team' AND q.team_id = p.team_id)
         ORDER BY t.name",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

pub(crate) fn latest(
    c: &mut Tx<'_>,
    scope: &str,
    team: Option<i64>,
) -> Result<Option<(i64, String)>, ApiError> {
    let row = |r: &db::Row| Ok((r.get(0)?, r.get(1)?));
    match team {
        None => c.query_opt(
            "SELECT version, text FROM policies WHERE scope = ?1 AND team_id IS NULL
             ORDER BY version DESC LIMIT 1",
            params![scope],
            row,
        ),
        Some(id) => c.query_opt(
            "SELECT version, text FROM policies WHERE scope = ?1 AND team_id = ?2
             ORDER BY version DESC LIMIT 1",
            params![scope, id],
            row,
        ),
    }
}

/// `GET /api/v1/policy`: the caller's org and team policy as signed
/// bundles, with the versions and the expiry; `304` when the caller's
/// `If-None-Match` names what it has.
pub async fn fetch(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ttl = s.config.bundle_ttl.as_secs() as i64;
    let (team_id, team) = (caller.team_id, caller.team.clone());
    let (org, team_policy, key) =
        s.db.run(move |c| {
            let org = latest(c, "org", None)?;
            let team_policy = match team_id {
                Some(id) => latest(c, "team", Some(id))?,
                None => None,
            };
            let key = signing_key(c)?;
            Ok((org, team_policy, key))
        })
        .await?;
    // At least `ttl` away, rounded up: stable for a while.
    let step = ttl.clamp(1, 3600);
    let expires = (db::now() + ttl + step - 1) / step * step;
    let etag = format!(
        "\"{}-{}-{}-{}\"",
        org.as_ref().map_or(0, |o| o.0),
        team_policy.as_ref().map_or(0, |t| t.0),
        team.as_deref().unwrap_or("-"),
        expires
    );
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == etag);
    if cached {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let bundle = |p: Option<(i64, String)>| {
        p.map(|(version, text)| {
            json!({ "version": version, "bundle": sbx_policy::sign_until(&text, &key, expires) })
        })
    };
    let body = json!({
        "org": bundle(org),
        "team": bundle(team_policy),
        "team_name": team,
        "expires": expires,
        "key": sbx_policy::encode_public_key(&key.verifying_key()).trim(),
    });
    Ok(([(header::ETAG, etag)], Json(body)).into_response())
}
