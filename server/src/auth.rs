//! Who is calling: bearer tokens (random, shown once, stored only as their
//! SHA-256), the user and role behind each, and the checks every route
//! makes before it does anything.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::db::{self, params};
use crate::error::ApiError;
use crate::AppState;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything, in every team.
    OrgAdmin,
    /// Its own team's members and policy.
    TeamAdmin,
    /// Sign machines in; read its own team's policy.
    Member,
    /// Read everything, change nothing.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::OrgAdmin => "org-admin",
            Role::TeamAdmin => "team-admin",
            Role::Member => "member",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "org-admin" => Role::OrgAdmin,
            "team-admin" => Role::TeamAdmin,
            "member" => Role::Member,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }
}

/// A new secret token with a prefix that says what it is (`sbxu_` a
/// person's, `sbxm_` a machine's, `sbxs_` the setup token).
pub fn new_token(prefix: &str) -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// How a token is stored: its SHA-256, so the database cannot sign anyone in.
pub fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Bytes (a digest, a MAC) as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: i64,
    pub user_id: i64,
    pub email: String,
    pub role: Role,
    pub team_id: Option<i64>,
    pub team: Option<String>,
    /// The machine, for a machine token.
    pub machine: Option<String>,
}

impl Caller {
    /// Refuses unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{} is a {} and may not {what}",
                self.email,
                self.role.as_str()
            )))
        }
    }

    /// What of the audit trail the caller may see: a column of a table
    /// aliased `a` (the records, or the dashboard's running totals) and a
    /// comparison, to complete with one parameter, and its value. Org
    /// admins and auditors see everyone's (user ids start at 1), team
    /// admins their team's, members their own.
    pub fn audit_scope(&self) -> (&'static str, i64) {
        match self.role {
            Role::OrgAdmin | Role::Auditor => ("a.user_id >", 0),
            Role::TeamAdmin => ("a.team_id =", self.team_id.unwrap_or(-1)),
            Role::Member => ("a.user_id =", self.user_id),
        }
    }

    /// Refuses machine tokens: some things only a person does.
    pub fn require_person(&self, what: &str) -> Result<(), ApiError> {
        match &self.machine {
            None => Ok(()),
            Some(m) => Err(ApiError::Forbidden(format!(
                "a machine's token (machine `{m}`) may not {what}: use a person's token"
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "no bearer token: sign in with `sbx login URL`, or send Authorization: Bearer <token>".into(),
                )
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| {
                ApiError::Unauthenticated("the Authorization header is not `Bearer <token>`".into())
            })?
            .trim()
            .to_string();
        let h = hash(&token);
        let caller = state.db.run(move |c| lookup(c, &h)).await?;
        state.token_limiter.check(caller.token_id)?;
        Ok(caller)
    }
}

/// The caller a token (by its hash) stands for; refuses unknown and revoked
/// tokens. Counts as a use of the token.
pub fn lookup(c: &mut db::Tx<'_>, token_hash: &str) -> Result<Caller, ApiError> {
    let row = c.query_opt(
        "SELECT t.id, t.revoked, t.machine, u.id, u.email, u.role, u.team_id, tm.name
         FROM tokens t JOIN users u ON u.id = t.user_id
         LEFT JOIN teams tm ON tm.id = u.team_id WHERE t.hash = ?1",
        params![token_hash],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                r.get::<Option<i64>>(1)?,
                r.get::<Option<String>>(2)?,
                r.get::<i64>(3)?,
                r.get::<String>(4)?,
                r.get::<String>(5)?,
                r.get::<Option<i64>>(6)?,
                r.get::<Option<String>>(7)?,
            ))
        },
    )?;
    let Some((token_id, revoked, machine, user_id, email, role, team_id, team)) = row else {
        return Err(ApiError::Unauthenticated(
            "unknown token: sign in again with `sbx login URL`".into(),
        ));
    };
    if revoked.is_some() {
        return Err(ApiError::Unauthenticated(
            "this token was revoked: sign in again with `sbx login URL`".into(),
        ));
    }
    c.execute(
        "UPDATE tokens SET last_used = ?1 WHERE id = ?2",
        params![db::now(), token_id],
    )?;
    let role = Role::parse(&role)
        .ok_or_else(|| ApiError::Internal(format!("user {email} has an unknown role {role}")))?;
    Ok(Caller {
        token_id,
        user_id,
        email,
        role,
        team_id,
        team,
        machine,
    })
}
