//! The dashboard: pages rendered here, under `/ui`, for the organisation's
//! people (signed in with a cookie; forms carry a CSRF token), with the
//! same role checks as the API. Nothing is fetched from elsewhere: the
//! styles and the one script are in the pages.
//!
//! - `signin.rs`: signing in and out, the `Viewer` of every page, CSRF;
//! - `overview.rs`: a period at a glance: sessions, decisions by surface
//!   over time, the most refused, the alerts;
//! - `sessions.rs`: the sessions machines shipped, and one's timeline;
//! - `policy.rs`: org and team policy, versions, diffs, the editor;
//! - `explain.rs`: what the policies decide on a request, and why;
//! - `alerts.rs`: alerts, and acknowledging them;
//! - `diff.rs`: a line diff for policy versions.

use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

mod alerts;
mod diff;
mod explain;
mod overview;
mod policy;
mod sessions;
mod signin;

pub use signin::Viewer;

/// Every page and form of the dashboard.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(sessions::home))
        .route("/ui/", get(sessions::home))
        .route("/ui/signin", get(signin::form).post(signin::submit))
        .route("/ui/signout", post(signin::signout))
        .route("/ui/overview", get(overview::show))
        .route("/ui/sessions", get(sessions::list))
        .route("/ui/alerts", get(alerts::list))
        .route("/ui/alerts/{id}/ack", post(alerts::ack))
        .route("/ui/sessions/{machine}/{session}", get(sessions::timeline))
        .route("/ui/policy", get(policy::index))
        .route("/ui/policy/check", post(policy::check))
        .route("/ui/policy/explain", get(explain::show))
        .route("/ui/policy/org", get(policy::org))
        .route(
            "/ui/policy/org/edit",
            get(policy::edit_org).post(policy::save_org),
        )
        .route("/ui/policy/teams/{team}", get(policy::team))
        .route(
            "/ui/policy/teams/{team}/edit",
            get(policy::edit_team).post(policy::save_team),
        )
}

/// An error on a page, answered as a page (the API answers JSON).
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if let ApiError::Internal(m) = &self.0 {
            tracing::error!("{m}");
        }
        let html = format!(
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{code} · sbx</title>
<style>{STYLE}</style></head><body><main><h1>{code}</h1><p class="flag" id="page-error">{msg}</p>
<p><a href="/ui/sessions">Sessions</a> · <a href="/ui/policy">Policy</a></p></main></body></html>"#,
            code = status,
            msg = esc(&self.0.to_string()),
        );
        (status, Html(html)).into_response()
    }
}

/// Text made safe inside HTML and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch as people read them (RFC 3339).
pub(crate) fn when(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// A path segment made safe inside a URL.
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d232b; background: #f6f7f9; }
header { background: #1d232b; color: #fff; padding: .6em 1.2em; display: flex; gap: 1.5em; align-items: center; }
header a { color: #cfe3ff; text-decoration: none; }
header form { margin-left: auto; }
main { padding: 1em 1.2em; max-width: 1200px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e3e6ea; vertical-align: top; }
th { background: #eef1f4; }
.deny { color: #b00020; font-weight: 600; }
.allow { color: #1b7f3b; }
.flag { background: #fff1f1; border: 1px solid #f2b8b8; padding: .5em; margin: .5em 0; }
.ok { background: #eefaf1; border: 1px solid #b9e3c6; padding: .5em; margin: .5em 0; }
pre.policy { background: #fff; border: 1px solid #e3e6ea; padding: 0; counter-reset: line; }
pre.policy span { display: block; padding: 0 .6em; }
pre.policy span:target { background: #fff3bf; }
pre.policy a.ln { color: #8a939e; display: inline-block; width: 3em; text-decoration: none; }
.diff .add { background: #e6ffec; } .diff .del { background: #ffebe9; }
textarea { width: 100%; min-height: 22em; font: 13px/1.45 ui-monospace, monospace; }
#error { min-height: 1.5em; }
.muted { color: #6b7480; }
"#;

/// A whole page for `viewer`.
pub(crate) fn page(viewer: &Viewer, title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title} · sbx</title>
<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head><body>
<header><strong>sbx</strong><a href="/ui/overview">Overview</a><a href="/ui/sessions">Sessions</a><a href="/ui/alerts">Alerts</a><a href="/ui/policy">Policy</a>
<form method="post" action="/ui/signout"><input type="hidden" name="csrf" value="{csrf}">
<span class="muted">{who} ({role})</span> <button>Sign out</button></form></header>
<main><h1>{title}</h1>{body}</main></body></html>"#,
        title = esc(title),
        csrf = esc(&viewer.csrf),
        who = esc(&viewer.caller.email),
        role = viewer.caller.role.as_str(),
    ))
}
