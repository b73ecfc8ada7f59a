//! People sign in to the dashboard with their personal token (`sbxu_...`,
//! the one an admin handed them); the server answers with a cookie of its
//! own that is `HttpOnly`, `SameSite=Strict` and `Secure` behind https, and
//! stores only its hash. Every form and script request carries the
//! session's CSRF token as well. Machine tokens sign no one in, and
//! revoking the token a person signed in with ends their dashboard
//! sessions too.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;
use serde_json::json;

use super::esc;
use crate::admin_log;
use crate::auth::{self, Caller, Role};
use crate::db::{self, params};
use crate::error::ApiError;
use crate::AppState;

const COOKIE: &str = "sbx_ui";
/// How long a sign-in lasts.
const LIFETIME: i64 = 12 * 3600;

/// The person looking at a page.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub caller: Caller,
    pub csrf: String,
}

impl Viewer {
    /// Refuses a form or request whose CSRF token is not this session's.
    pub fn check_csrf(&self, given: &str) -> Result<(), ApiError> {
        if !given.is_empty() && auth::hash(given) == auth::hash(&self.csrf) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this form is stale or did not come from the dashboard: reload the page and try again"
                    .into(),
            ))
        }
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

impl FromRequestParts<AppState> for Viewer {
    /// Not signed in (or signed out, or expired): to the sign-in page.
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_signin = || Redirect::to("/ui/signin").into_response();
        let Some(value) = cookie(&parts.headers) else {
            return Err(to_signin());
        };
        let h = auth::hash(&value);
        let found = state
            .db
            .run(move |c| {
                let row = c.query_opt(
                    "SELECT w.user_id, w.csrf, w.expires, u.email, u.role, u.team_id, t.name
                     FROM web_sessions w JOIN users u ON u.id = w.user_id
                     JOIN tokens k ON k.id = w.token_id AND k.revoked IS NULL
                     LEFT JOIN teams t ON t.id = u.team_id WHERE w.hash = ?1",
                    params![h],
                    |r| {
                        Ok((
                            r.get::<i64>(0)?,
                            r.get::<String>(1)?,
                            r.get::<i64>(2)?,
                            r.get::<String>(3)?,
                            r.get::<String>(4)?,
                            r.get::<Option<i64>>(5)?,
                            r.get::<Option<String>>(6)?,
                        ))
                    },
                )?;
                Ok(row.filter(|r| r.2 > db::now()))
            })
            .await;
        let Ok(Some((user_id, csrf, _, email, role, team_id, team))) = found else {
            return Err(to_signin());
        };
        let Some(role) = Role::parse(&role) else {
            return Err(to_signin());
        };
        Ok(Viewer {
            caller: Caller {
                token_id: 0,
                user_id,
                email,
                role,
                team_id,
                team,
                machine: None,
            },
            csrf,
        })
    }
}

fn signin_page(status: StatusCode, message: &str) -> Response {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(r#"<p class="flag" id="signin-error">{}</p>"#, esc(message))
    };
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in · sbx</title>
<style>body{{font:14px system-ui,sans-serif;max-width:30em;margin:4em auto}}input{{width:100%;padding:.4em}}
.flag{{background:#fff1f1;border:1px solid #f2b8b8;padding:.5em}}</style></head><body>
<h1>sbx: sign in</h1>{message}
<form method="post" action="/ui/signin">
<label>Your personal token (<code>sbxu_...</code>, from your admin)<br>
<input type="password" name="token" id="token" autocomplete="off" autofocus></label>
<p><button id="signin">Sign in</button></p></form></body></html>"#
    );
    (status, Html(html)).into_response()
}

/// `GET /ui/signin`.
pub async fn form() -> Response {
    signin_page(StatusCode::OK, "")
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
}

/// `POST /ui/signin`: a person's token for a dashboard session.
pub async fn submit(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<SignIn>,
) -> Response {
    if let Err(e) = s.limiter.check(peer.ip()) {
        return signin_page(e.status(), &e.to_string());
    }
    let session = match auth::new_token("sbxw_").and_then(|v| Ok((v, auth::new_token("")?))) {
        Ok(v) => v,
        Err(e) => return signin_page(e.status(), &e.to_string()),
    };
    let (value, csrf) = session;
    let (h, token) = (auth::hash(&value), auth::hash(f.token.trim()));
    let made = s
        .db
        .run(move |c| {
            let caller = auth::lookup(c, &token)?;
            if let Some(m) = &caller.machine {
                return Err(ApiError::Forbidden(format!(
                    "that is machine `{m}`'s token: sign in with your personal token"
                )));
            }
            c.execute("DELETE FROM web_sessions WHERE expires < ?1", params![db::now()])?;
            c.execute(
                "INSERT INTO web_sessions (hash, user_id, token_id, csrf, created, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![h, caller.user_id, caller.token_id, csrf, db::now(), db::now() + LIFETIME],
            )?;
            admin_log::record(c, Some(caller.user_id), "person_signed_in", &caller.email, json!({ "via": "dashboard" }))?;
            Ok(())
        })
        .await;
    if let Err(e) = made {
        return signin_page(e.status(), &e.to_string());
    }
    let secure = if s.config.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={LIFETIME}{secure}"
            ),
        )],
        Redirect::to("/ui/overview"),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct Csrf {
    csrf: String,
}

/// `POST /ui/signout`: ends the session here and in the database.
pub async fn signout(
    State(s): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(f): Form<Csrf>,
) -> Result<Response, super::PageError> {
    viewer.check_csrf(&f.csrf)?;
    if let Some(value) = cookie(&headers) {
        let h = auth::hash(&value);
        s.db.run(move |c| c.execute("DELETE FROM web_sessions WHERE hash = ?1", params![h]))
            .await?;
    }
    Ok((
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/ui/signin"),
    )
        .into_response())
}
