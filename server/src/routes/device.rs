//! Signing a machine in with a device code (as RFC 8628 does): `sbx login`
//! asks for a code, shows the short user code, and polls; a signed-in
//! person approves the code (in the browser, at `/device`, or with the
//! API); the next poll gets a machine token for that person, once.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::response::Html;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin_log;
use crate::auth::{self, Caller};
use crate::db::{self, params};
use crate::error::ApiError;
use crate::routes::identity;
use crate::AppState;

/// How long a code may wait for its approval.
const CODE_TTL: i64 = 600;
/// Seconds between polls.
const INTERVAL: u64 = 2;
/// Letters that cannot be mistaken for one another.
const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

fn user_code() -> Result<String, ApiError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    let chars: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    Ok(format!("{}-{}", &chars[..4], &chars[4..]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    machine: String,
}

/// `POST /api/v1/device/code`: a code for a machine to be approved.
pub async fn code(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<CodeRequest>,
) -> Result<Json<Value>, ApiError> {
    s.limiter.check(peer.ip())?;
    let ok = !req.machine.is_empty()
        && req.machine.len() <= 64
        && req.machine.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(ApiError::BadRequest(
            "`machine` is 1 to 64 printable characters without spaces".into(),
        ));
    }
    let device = auth::new_token("sbxd_")?;
    let user = user_code()?;
    let (d, u) = (auth::hash(&device), user.clone());
    s.db.run(move |c| {
        c.execute("DELETE FROM device_codes WHERE expires < ?1", params![db::now()])?;
        c.execute(
            "INSERT INTO device_codes (device_hash, user_code, machine, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![d, u, req.machine, db::now(), db::now() + CODE_TTL],
        )?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({
        "device_code": device,
        "user_code": user,
        "verification_uri": format!("{}/device", s.config.public_url.trim_end_matches('/')),
        "expires_in": CODE_TTL,
        "interval": INTERVAL,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    user_code: String,
}

/// `POST /api/v1/device/approve`: a person vouches for the machine showing
/// this code; the machine's token will act as them.
pub async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    Json(req): Json<Approve>,
) -> Result<Json<Value>, ApiError> {
    caller.require_person("approve a sign-in")?;
    let code = req.user_code.trim().to_ascii_uppercase();
    s.db.run(move |c| {
        let row: Option<(String, i64, Option<i64>)> = c.query_opt(
            "SELECT machine, expires, user_id FROM device_codes WHERE user_code = ?1",
            params![code],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let Some((machine, expires, user)) = row else {
            return Err(ApiError::NotFound(format!(
                "no sign-in waits for code {code}: check it, or run `sbx login` again"
            )));
        };
        if expires < db::now() {
            return Err(ApiError::BadRequest(format!(
                "code {code} expired: run `sbx login` again"
            )));
        }
        if user.is_some() {
            return Err(ApiError::Conflict(format!(
                "code {code} is approved already"
            )));
        }
        c.execute(
            "UPDATE device_codes SET user_id = ?1 WHERE user_code = ?2",
            params![caller.user_id, code],
        )?;
        admin_log::record(
            c,
            Some(caller.user_id),
            "approve_machine",
            &machine,
            json!({ "code": code }),
        )?;
        Ok(Json(
            json!({ "machine": machine, "approved_as": caller.email }),
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    device_code: String,
}

/// `POST /api/v1/device/token`: the machine's poll. `authorization_pending`
/// until approved; then a machine token, the organisation's public key
/// (which the machine pins) and who it acts as; then never again.
pub async fn token(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<TokenRequest>,
) -> Result<Json<Value>, ApiError> {
    s.limiter.check(peer.ip())?;
    let h = auth::hash(&req.device_code);
    s.db.run(move |tx| {
        let row: Option<(String, i64, Option<i64>, i64)> = tx.query_opt(
            "SELECT machine, expires, user_id, used FROM device_codes WHERE device_hash = ?1",
            params![h],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let Some((machine, expires, user, used)) = row else {
            return Err(ApiError::Unauthenticated("unknown device code: run `sbx login` again".into()));
        };
        if used != 0 {
            return Err(ApiError::Unauthenticated(
                "this device code was used already: run `sbx login` again".into(),
            ));
        }
        if expires < db::now() {
            return Err(ApiError::BadRequest("expired_token: the code was not approved in time; run `sbx login` again".into()));
        }
        let Some(user) = user else {
            return Err(ApiError::Pending);
        };
        // Once only: of two polls at the same time, one changes the row.
        let claimed = tx.execute(
            "UPDATE device_codes SET used = 1 WHERE device_hash = ?1 AND used = 0",
            params![h],
        )?;
        if claimed == 0 {
            return Err(ApiError::Unauthenticated(
                "this device code was used already: run `sbx login` again".into(),
            ));
        }
        let token = identity::issue(tx, user, &machine)?;
        let (email, role, team): (String, String, Option<String>) = tx.query_one(
            "SELECT u.email, u.role, t.name FROM users u LEFT JOIN teams t ON t.id = u.team_id WHERE u.id = ?1",
            params![user],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let key = identity::signing_key(tx)?;
        admin_log::record(tx, Some(user), "machine_signed_in", &machine, json!({}))?;
        Ok(Json(json!({
            "token": token,
            "email": email,
            "role": role,
            "team": team,
            "machine": machine,
            "org_key": sbx_policy::encode_public_key(&key.verifying_key()).trim(),
        })))
    })
    .await
}

/// `GET /device`: where a person approves a code in the browser, with
/// their own token (the dashboard will sign people in properly).
pub async fn page() -> Html<&'static str> {
    Html(include_str!("device.html"))
}
