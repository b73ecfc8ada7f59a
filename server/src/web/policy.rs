//! Org and team policy on the dashboard: each version with numbered lines
//! (a decision's rule links to its line), the history with diffs, and an
//! editor that checks as the person types, with the same errors, line and
//! column as `sbx policy check` and the API.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::diff::{self, Op};
use super::{esc, page, seg, when, PageError, Viewer};
use crate::auth::{Caller, Role};
use crate::db::{params, Tx};
use crate::error::ApiError;
use crate::routes::policy as api;
use crate::AppState;

/// One pushed version.
struct Version {
    version: i64,
    author: String,
    created: i64,
    text: String,
}

/// Refuses a team's pages to people of other teams.
pub(super) fn may_see(caller: &Caller, team: &str) -> Result<(), ApiError> {
    match caller.role {
        Role::OrgAdmin | Role::Auditor => Ok(()),
        _ if caller.team.as_deref() == Some(team) => Ok(()),
        _ => Err(ApiError::Forbidden(format!(
            "team `{team}`'s policy is for its people, org admins and auditors"
        ))),
    }
}

/// Every version of the org policy (`team` None) or a team's, newest first.
fn versions(c: &mut Tx<'_>, team: Option<&str>) -> Result<Vec<Version>, ApiError> {
    let row = |r: &crate::db::Row| {
        Ok(Version {
            version: r.get(0)?,
            author: r.get(1)?,
            created: r.get(2)?,
            text: r.get(3)?,
        })
    };
    match team {
        None => c.query_map(
            "SELECT p.version, u.email, p.created, p.text FROM policies p JOIN users u ON u.id = p.author
             WHERE p.scope = 'org' ORDER BY p.version DESC",
            params![],
            row,
        ),
        Some(t) => c.query_map(
            "SELECT p.version, u.email, p.created, p.text FROM policies p JOIN users u ON u.id = p.author
             JOIN teams tm ON tm.id = p.team_id WHERE p.scope = 'team' AND tm.name = ?1 ORDER BY p.version DESC",
            params![t],
            row,
        ),
    }
}

fn base(team: Option<&str>) -> String {
    match team {
        None => "/ui/policy/org".into(),
        Some(t) => format!("/ui/policy/teams/{}", seg(t)),
    }
}

/// `GET /ui/policy`: the org's and the teams' policies the viewer may see.
pub async fn index(State(s): State<AppState>, viewer: Viewer) -> Result<Html<String>, PageError> {
    let caller = viewer.caller.clone();
    let teams = s
        .db
        .run(move |c| {
            c.query_map(
                "SELECT t.name, MAX(p.version) FROM teams t LEFT JOIN policies p ON p.team_id = t.id AND p.scope = 'team'
                 GROUP BY t.name ORDER BY t.name",
                params![],
                |r| Ok((r.get::<String>(0)?, r.get::<Option<i64>>(1)?)),
            )
        })
        .await?;
    let mut body = String::from(
        "<table><tr><th>Policy</th><th>Version</th></tr><tr><td><a href=\"/ui/policy/org\">org</a></td><td></td></tr>",
    );
    for (team, v) in teams.iter().filter(|(t, _)| may_see(&caller, t).is_ok()) {
        body.push_str(&format!(
            "<tr><td><a href=\"{}\">team {}</a></td><td>{}</td></tr>",
            base(Some(team)),
            esc(team),
            v.map_or("none yet".into(), |v| format!("v{v}"))
        ));
    }
    body.push_str("</table>");
    body.push_str(
        "<p><a id=\"explain\" href=\"/ui/policy/explain\">Explain a decision</a>: what the policies decide on a request, and every rule that matched.</p>",
    );
    Ok(page(&viewer, "Policy", &body))
}

#[derive(Deserialize)]
pub struct Show {
    v: Option<i64>,
    /// Show the change from the version before.
    diff: Option<u8>,
}

async fn show(
    s: AppState,
    viewer: Viewer,
    team: Option<String>,
    q: Show,
) -> Result<Html<String>, PageError> {
    if let Some(t) = &team {
        may_see(&viewer.caller, t)?;
    }
    let t = team.clone();
    let all = s.db.run(move |c| versions(c, t.as_deref())).await?;
    let what = match &team {
        None => "Org policy".to_string(),
        Some(t) => format!("Team {t}'s policy"),
    };
    let base = base(team.as_deref());
    let mut body = String::new();
    if api::may_push(&viewer.caller, team.as_deref()).is_ok() {
        body.push_str(&format!(
            "<p><a id=\"edit\" href=\"{base}/edit\">Edit: push a new version</a></p>"
        ));
    }
    let shown = match q.v {
        Some(v) => all.iter().find(|x| x.version == v),
        None => all.first(),
    };
    match shown {
        None if all.is_empty() => body.push_str("<p class=\"muted\">No version pushed yet.</p>"),
        None => return Err(ApiError::NotFound(format!("no version {}", q.v.unwrap_or(0))).into()),
        Some(cur) => {
            body.push_str(&format!(
                "<p id=\"version\">Version {} by {}, {}</p>",
                cur.version,
                esc(&cur.author),
                when(cur.created)
            ));
            let before = all.iter().find(|x| x.version == cur.version - 1);
            if let (Some(1), Some(prev)) = (q.diff, before) {
                body.push_str(&format!(
                    "<h2>Changes from version {}</h2><pre class=\"policy diff\" id=\"diff\">",
                    prev.version
                ));
                for (op, line) in diff::lines(&prev.text, &cur.text) {
                    let (class, mark) = match op {
                        Op::Same => ("", ' '),
                        Op::Del => ("del", '-'),
                        Op::Add => ("add", '+'),
                    };
                    body.push_str(&format!(
                        "<span class=\"{class}\">{mark} {}</span>",
                        esc(line)
                    ));
                }
                body.push_str("</pre>");
            }
            body.push_str("<pre class=\"policy\" id=\"text\">");
            for (i, line) in cur.text.lines().enumerate() {
                let n = i + 1;
                body.push_str(&format!(
                    "<span id=\"L{n}\"><a class=\"ln\" href=\"#L{n}\">{n}</a>{}</span>",
                    esc(line)
                ));
            }
            body.push_str("</pre>");
        }
    }
    body.push_str(
        "<h2>History</h2><table id=\"history\"><tr><th>Version</th><th>By</th><th>When</th><th></th></tr>",
    );
    for v in &all {
        let diff = if v.version > 1 {
            format!("<a href=\"{base}?v={}&amp;diff=1\">diff</a>", v.version)
        } else {
            String::new()
        };
        body.push_str(&format!(
            "<tr><td><a href=\"{base}?v={0}\">v{0}</a></td><td>{1}</td><td>{2}</td><td>{diff}</td></tr>",
            v.version,
            esc(&v.author),
            when(v.created)
        ));
    }
    body.push_str("</table>");
    Ok(page(&viewer, &what, &body))
}

/// `GET /ui/policy/org`.
pub async fn org(
    State(s): State<AppState>,
    viewer: Viewer,
    Query(q): Query<Show>,
) -> Result<Html<String>, PageError> {
    show(s, viewer, None, q).await
}

/// `GET /ui/policy/teams/{team}`.
pub async fn team(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(team): Path<String>,
    Query(q): Query<Show>,
) -> Result<Html<String>, PageError> {
    show(s, viewer, Some(team), q).await
}

/// The editor: the text, the error as the person types, save.
fn editor(viewer: &Viewer, team: Option<&str>, text: &str, error: &str) -> Html<String> {
    let what = match team {
        None => "Edit the org policy".to_string(),
        Some(t) => format!("Edit team {t}'s policy"),
    };
    let team_json = serde_json::to_string(&team).unwrap_or_else(|_| "null".into());
    let body = format!(
        r#"<form method="post" id="editor">
<input type="hidden" name="csrf" value="{csrf}">
<p id="error" class="{class}">{error}</p>
<textarea name="text" id="text" spellcheck="false">{text}</textarea>
<p><button id="save">Push as a new version</button> <a href="{base}">Cancel</a></p></form>
<script>
const text = document.getElementById('text'), out = document.getElementById('error');
let timer;
async function check() {{
  const r = await fetch('/ui/policy/check', {{ method: 'POST',
    headers: {{ 'content-type': 'application/json', 'x-csrf-token': '{csrf}' }},
    body: JSON.stringify({{ team: {team_json}, text: text.value }}) }});
  const v = await r.json();
  out.className = v.ok ? 'ok' : 'flag';
  out.textContent = v.ok ? 'No errors.' : v.error;
  out.dataset.line = v.line || '';
}}
text.addEventListener('input', () => {{ clearTimeout(timer); timer = setTimeout(check, 250); }});
</script>"#,
        csrf = esc(&viewer.csrf),
        class = if error.is_empty() { "" } else { "flag" },
        error = esc(error),
        text = esc(text),
        base = base(team),
    );
    page(viewer, &what, &body)
}

async fn edit(
    s: AppState,
    viewer: Viewer,
    team: Option<String>,
) -> Result<Html<String>, PageError> {
    api::may_push(&viewer.caller, team.as_deref())?;
    let t = team.clone();
    let all = s.db.run(move |c| versions(c, t.as_deref())).await?;
    let text = all.first().map(|v| v.text.clone()).unwrap_or_else(|| {
        format!(
            "layer = \"{}\"\n",
            if team.is_some() { "team" } else { "org" }
        )
    });
    Ok(editor(&viewer, team.as_deref(), &text, ""))
}

/// `GET /ui/policy/org/edit` (org admins).
pub async fn edit_org(
    State(s): State<AppState>,
    viewer: Viewer,
) -> Result<Html<String>, PageError> {
    edit(s, viewer, None).await
}

/// `GET /ui/policy/teams/{team}/edit` (org admins, that team's admins).
pub async fn edit_team(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(team): Path<String>,
) -> Result<Html<String>, PageError> {
    edit(s, viewer, Some(team)).await
}

#[derive(Deserialize)]
pub struct Save {
    csrf: String,
    text: String,
}

/// The saved version's diff, or the editor again with the error.
async fn save(
    s: AppState,
    viewer: Viewer,
    team: Option<String>,
    f: Save,
) -> Result<Response, PageError> {
    viewer.check_csrf(&f.csrf)?;
    api::may_push(&viewer.caller, team.as_deref())?;
    let (caller, t, text) = (
        viewer.caller.clone(),
        team.clone(),
        f.text.replace("\r\n", "\n"),
    );
    let body = text.clone();
    match s
        .db
        .run(move |c| api::push(c, &caller, t.as_deref(), body))
        .await
    {
        Ok(v) => {
            Ok(Redirect::to(&format!("{}?v={v}&diff=1", base(team.as_deref()))).into_response())
        }
        Err(e @ (ApiError::Policy { .. } | ApiError::Conflict(_) | ApiError::BadRequest(_))) => {
            Ok((
                e.status(),
                editor(&viewer, team.as_deref(), &text, &e.to_string()),
            )
                .into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /ui/policy/org/edit`.
pub async fn save_org(
    State(s): State<AppState>,
    viewer: Viewer,
    Form(f): Form<Save>,
) -> Result<Response, PageError> {
    save(s, viewer, None, f).await
}

/// `POST /ui/policy/teams/{team}/edit`.
pub async fn save_team(
    State(s): State<AppState>,
    viewer: Viewer,
    Path(team): Path<String>,
    Form(f): Form<Save>,
) -> Result<Response, PageError> {
    save(s, viewer, Some(team), f).await
}

#[derive(Deserialize)]
pub struct Check {
    team: Option<String>,
    text: String,
}

/// `POST /ui/policy/check`: the editor's check as the person types: `{ok}`
/// or the error with its line and column.
pub async fn check(
    State(s): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Json(q): Json<Check>,
) -> Result<Json<Value>, ApiError> {
    let csrf = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    viewer.check_csrf(csrf)?;
    let layer = if q.team.is_some() { "team" } else { "org" };
    let org = match q.team {
        Some(_) => {
            s.db.run(|c| api::latest(c, "org", None))
                .await?
                .map(|(_, text)| text)
        }
        None => None,
    };
    Ok(Json(match api::validate(&q.text, layer, org.as_deref()) {
        Ok(()) => json!({ "ok": true }),
        Err(ApiError::Policy { line, message }) => {
            json!({ "ok": false, "line": line, "error": format!("line {line}: {message}") })
        }
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }))
}
