//! Alerts on the dashboard: newest first, each with where it came from (a
//! link to the session's timeline), how its deliveries went, and, for
//! those who may, a button to acknowledge it.

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::{esc, page, seg, when, PageError, Viewer};
use crate::alerts;
use crate::auth::Role;
use crate::AppState;

/// `GET /ui/alerts`.
pub async fn list(State(s): State<AppState>, viewer: Viewer) -> Result<Html<String>, PageError> {
    let caller = viewer.caller.clone();
    let rows = s.db.run(move |c| alerts::list(c, &caller)).await?;
    let may_ack = matches!(viewer.caller.role, Role::OrgAdmin | Role::TeamAdmin);
    let mut body = String::from(
        "<table id=\"alerts\"><tr><th>When</th><th>Alert</th><th>Where</th><th>Who</th>\
         <th>What</th><th>Delivered</th><th></th></tr>",
    );
    for a in &rows {
        let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
        let at = when(a["at"].as_i64().unwrap_or(0));
        let ack = match a["acked_by"].as_str() {
            Some(by) => format!("seen by {}", esc(by)),
            None if may_ack => format!(
                "<form method=\"post\" action=\"/ui/alerts/{}/ack\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button>Acknowledge</button></form>",
                a["id"],
                esc(&viewer.csrf)
            ),
            None => "<span class=\"deny\">new</span>".into(),
        };
        body.push_str(&format!(
            "<tr><td>{at}</td><td class=\"deny\">{}</td><td><a href=\"/ui/sessions/{}/{}\">{} / {}</a> #{}</td>\
             <td>{}</td><td>{}</td><td>{} of {}</td><td>{ack}</td></tr>",
            esc(&s("kind")),
            seg(&s("machine")),
            seg(&s("session")),
            esc(&s("machine")),
            esc(&s("session")),
            a["seq"],
            esc(&s("user")),
            esc(&s("summary")),
            a["delivered"],
            a["webhooks"],
        ));
    }
    body.push_str("</table>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No alerts.</p>");
    }
    Ok(page(&viewer, "Alerts", &body))
}

#[derive(Deserialize)]
pub struct Ack {
    csrf: String,
}

/// `POST /ui/alerts/{id}/ack`.
pub async fn ack(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(f): Form<Ack>,
) -> Result<Response, PageError> {
    viewer.check_csrf(&f.csrf)?;
    let caller = viewer.caller.clone();
    s.db.run(move |c| alerts::acknowledge(c, &caller, id))
        .await?;
    Ok(Redirect::to("/ui/alerts").into_response())
}
