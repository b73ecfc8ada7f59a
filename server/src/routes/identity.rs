//! The organisation's people: the one-time setup, teams, users with their
//! roles, and their tokens (listed and revoked).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin_log;
use crate::auth::{self, Caller, Role};
use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::AppState;

const SIGNING_KEY: &str = "signing_key";
const SETUP_HASH: &str = "setup_token_hash";

/// On open: makes the organisation's signing key on first start and, while
/// nobody is set up, a setup token (returned to be printed once).
pub fn prepare(c: &mut Tx<'_>) -> Result<Option<String>, ApiError> {
    // Instances starting together on one database make one key.
    c.serialize("prepare")?;
    if db::meta(c, SIGNING_KEY)?.is_none() {
        let key = sbx_policy::generate_key().map_err(|e| ApiError::Internal(e.to_string()))?;
        db::set_meta(c, SIGNING_KEY, sbx_policy::encode_secret_key(&key).trim())?;
    }
    let users: i64 = c.query_one("SELECT COUNT(*) FROM users", params![], |r| r.get(0))?;
    if users > 0 {
        return Ok(None);
    }
    let token = auth::new_token("sbxs_")?;
    db::set_meta(c, SETUP_HASH, &auth::hash(&token))?;
    Ok(Some(token))
}

/// The organisation's signing key.
pub fn signing_key(c: &mut Tx<'_>) -> Result<sbx_policy::SigningKey, ApiError> {
    let text = db::meta(c, SIGNING_KEY)?
        .ok_or_else(|| ApiError::Internal("the organisation has no signing key".into()))?;
    sbx_policy::decode_secret_key(&text).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Names of teams: what can be a path segment and a file name.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} `{name}`: use 1 to 40 lowercase letters, digits or `-`"
        )))
    }
}

fn check_email(email: &str) -> Result<(), ApiError> {
    let ok = email.len() <= 200
        && email
            .split_once('@')
            .is_some_and(|(a, b)| !a.is_empty() && b.contains('.'))
        && !email.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "`{email}` is not an e-mail address"
        )))
    }
}

fn issue_token(
    c: &mut Tx<'_>,
    user_id: i64,
    kind: &str,
    machine: Option<&str>,
) -> Result<String, ApiError> {
    let prefix = if kind == "machine" { "sbxm_" } else { "sbxu_" };
    let token = auth::new_token(prefix)?;
    c.execute(
        "INSERT INTO tokens (hash, user_id, kind, machine, created) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![auth::hash(&token), user_id, kind, machine, db::now()],
    )?;
    Ok(token)
}

pub(crate) fn issue(c: &mut Tx<'_>, user_id: i64, machine: &str) -> Result<String, ApiError> {
    issue_token(c, user_id, "machine", Some(machine))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    setup_token: String,
    email: String,
}

/// `POST /api/v1/setup`: the setup token printed at first start makes its
/// bearer the organisation's first admin, once.
pub async fn setup(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<Setup>,
) -> Result<Json<Value>, ApiError> {
    s.limiter.check(peer.ip())?;
    check_email(&req.email)?;
    s.db.run(move |tx| {
        let want = db::meta(tx, SETUP_HASH)?.ok_or_else(|| {
            ApiError::Forbidden(
                "this server is set up already: ask an org admin for an account".into(),
            )
        })?;
        if auth::hash(&req.setup_token) != want {
            return Err(ApiError::Unauthenticated(
                "wrong setup token: use the one sbx-server printed when it first started".into(),
            ));
        }
        tx.execute("DELETE FROM meta WHERE key = ?1", params![SETUP_HASH])?;
        let id: i64 = tx.query_one(
            "INSERT INTO users (email, role, created) VALUES (?1, 'org-admin', ?2) RETURNING id",
            params![req.email, db::now()],
            |r| r.get(0),
        )?;
        let token = issue_token(tx, id, "user", None)?;
        admin_log::record(tx, Some(id), "setup", &req.email, json!({}))?;
        Ok(Json(
            json!({ "email": req.email, "role": "org-admin", "token": token }),
        ))
    })
    .await
}

/// `GET /api/v1/me`.
pub async fn me(caller: Caller) -> Json<Value> {
    Json(json!({
        "email": caller.email,
        "role": caller.role.as_str(),
        "team": caller.team,
        "machine": caller.machine,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    name: String,
}

/// `POST /api/v1/teams` (org admins).
pub async fn create_team(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<NewTeam>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("create teams")?;
    caller.require(&[Role::OrgAdmin], "create teams")?;
    check_name("team", &req.name)?;
    s.db.run(move |c| {
        let done = c.execute(
            "INSERT INTO teams (name, created) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![req.name, db::now()],
        )?;
        if done == 0 {
            return Err(ApiError::Conflict(format!(
                "team `{}` exists already",
                req.name
            )));
        }
        admin_log::record(c, Some(caller.user_id), "create_team", &req.name, json!({}))?;
        Ok(Json(json!({ "name": req.name })))
    })
    .await
}

/// `GET /api/v1/teams`: every team for org admins and auditors, one's own
/// for the rest.
pub async fn list_teams(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    s.db.run(move |c| {
        let all = matches!(caller.role, Role::OrgAdmin | Role::Auditor);
        let teams: Vec<Value> = c
            .query_map("SELECT id, name FROM teams ORDER BY name", params![], |r| {
                Ok((r.get::<i64>(0)?, r.get::<String>(1)?))
            })?
            .into_iter()
            .filter(|(id, _)| all || caller.team_id == Some(*id))
            .map(|(_, name)| json!({ "name": name }))
            .collect();
        Ok(Json(json!(teams)))
    })
    .await
}

fn team_id(c: &mut Tx<'_>, name: &str) -> Result<i64, ApiError> {
    c.query_opt("SELECT id FROM teams WHERE name = ?1", params![name], |r| {
        r.get(0)
    })?
    .ok_or_else(|| {
        ApiError::NotFound(format!(
            "no team `{name}`: create it first (POST /api/v1/teams)"
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    email: String,
    role: String,
    team: Option<String>,
}

/// `POST /api/v1/users`: org admins add anyone; team admins add members to
/// their own team. The answer carries the person's first token, to hand
/// over once.
pub async fn create_user(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<NewUser>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("add people")?;
    caller.require(&[Role::OrgAdmin, Role::TeamAdmin], "add people")?;
    check_email(&req.email)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "role `{}`: use org-admin, team-admin, member or auditor",
            req.role
        ))
    })?;
    if caller.role == Role::TeamAdmin {
        if role != Role::Member {
            return Err(ApiError::Forbidden(
                "a team admin may add members only".into(),
            ));
        }
        if req.team.is_none() || req.team != caller.team {
            return Err(ApiError::Forbidden(format!(
                "a team admin may add people to their own team ({}) only",
                caller.team.as_deref().unwrap_or("none")
            )));
        }
    }
    if matches!(role, Role::TeamAdmin | Role::Member) && req.team.is_none() {
        return Err(ApiError::BadRequest(format!(
            "a {} belongs to a team: give `team`",
            role.as_str()
        )));
    }
    s.db.run(move |tx| {
        let team = req.team.as_deref().map(|t| team_id(tx, t)).transpose()?;
        let id: Option<i64> = tx.query_opt(
            "INSERT INTO users (email, role, team_id, created) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(email) DO NOTHING RETURNING id",
            params![req.email, role.as_str(), team, db::now()],
            |r| r.get(0),
        )?;
        let Some(id) = id else {
            return Err(ApiError::Conflict(format!(
                "{} has an account already",
                req.email
            )));
        };
        let token = issue_token(tx, id, "user", None)?;
        admin_log::record(
            tx,
            Some(caller.user_id),
            "create_user",
            &req.email,
            json!({ "role": role.as_str(), "team": req.team }),
        )?;
        Ok(Json(
            json!({ "email": req.email, "role": role.as_str(), "team": req.team, "token": token }),
        ))
    })
    .await
}

/// `GET /api/v1/users`: everyone for org admins and auditors, the team for
/// team admins.
pub async fn list_users(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(
        &[Role::OrgAdmin, Role::Auditor, Role::TeamAdmin],
        "list people",
    )?;
    s.db.run(move |c| {
        let users: Vec<Value> = c
            .query_map(
                "SELECT u.email, u.role, u.team_id, t.name FROM users u LEFT JOIN teams t ON t.id = u.team_id ORDER BY u.email",
                params![],
                |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<Option<i64>>(2)?, r.get::<Option<String>>(3)?)),
            )?
            .into_iter()
            .filter(|(_, _, team, _)| caller.role != Role::TeamAdmin || *team == caller.team_id)
            .map(|(email, role, _, team)| json!({ "email": email, "role": role, "team": team }))
            .collect();
        Ok(Json(json!(users)))
    })
    .await
}

/// `GET /api/v1/tokens`: one's own tokens (every token for org admins).
pub async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    s.db.run(move |c| {
        let tokens: Vec<Value> = c
            .query_map(
                "SELECT t.id, t.kind, t.machine, u.email, t.created, t.last_used, t.revoked, t.user_id
                 FROM tokens t JOIN users u ON u.id = t.user_id ORDER BY t.id",
                params![],
                |r| {
                Ok((
                    json!({
                        "id": r.get::<i64>(0)?,
                        "kind": r.get::<String>(1)?,
                        "machine": r.get::<Option<String>>(2)?,
                        "email": r.get::<String>(3)?,
                        "created": r.get::<i64>(4)?,
                        "last_used": r.get::<Option<i64>>(5)?,
                        "revoked": r.get::<Option<i64>>(6)?,
                        "current": r.get::<i64>(0)? == caller.token_id,
                    }),
                    r.get::<i64>(7)?,
                ))
            })?
            .into_iter()
            .filter(|(_, user)| caller.role == Role::OrgAdmin || *user == caller.user_id)
            .map(|(v, _)| v)
            .collect();
        Ok(Json(json!(tokens)))
    })
    .await
}

/// `DELETE /api/v1/tokens/{id}`: revokes one's own token, or (org admins)
/// anyone's. A revoked token is refused from the next request on.
pub async fn revoke_token(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    s.db.run(move |c| {
        let owner: Option<(i64, String)> = c.query_opt(
            "SELECT t.user_id, u.email FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let Some((owner, email)) = owner else {
            return Err(ApiError::NotFound(format!("no token {id}")));
        };
        if owner != caller.user_id && caller.role != Role::OrgAdmin {
            return Err(ApiError::Forbidden(format!(
                "token {id} is {email}'s: only they or an org admin may revoke it"
            )));
        }
        c.execute(
            "UPDATE tokens SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL",
            params![db::now(), id],
        )?;
        admin_log::record(c, Some(caller.user_id), "revoke_token", &id.to_string(), json!({ "owner": email }))?;
        Ok(Json(json!({ "revoked": id })))
    })
    .await
}
