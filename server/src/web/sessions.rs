//! Sessions, as machines shipped their records: the list, and one
//! session's timeline with each decision linked to the rule that made it
//! and the state of its chain (intact, or the flags the server raised).

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde_json::Value;

use super::{esc, page, seg, PageError, Viewer};
use crate::db::params;
use crate::error::ApiError;
use crate::AppState;

/// `GET /ui`: the overview.
pub async fn home(_viewer: Viewer) -> Response {
    Redirect::to("/ui/overview").into_response()
}

/// `GET /ui/sessions`: the newest sessions the viewer may see.
pub async fn list(State(s): State<AppState>, viewer: Viewer) -> Result<Html<String>, PageError> {
    let (cond, arg) = viewer.caller.audit_scope();
    let rows = s
        .db
        .run(move |c| {
            let flagged = c.query_map(
                "SELECT DISTINCT machine, session FROM audit_flags",
                params![],
                |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
            )?;
            let sql = format!(
                "SELECT a.machine, a.session, a.first_ts, a.last_ts, a.records, a.denied, u.email, t.name
                 FROM audit_sessions a JOIN users u ON u.id = a.user_id LEFT JOIN teams t ON t.id = a.team_id
                 WHERE {cond} ?1 ORDER BY a.last_ts DESC LIMIT 200"
            );
            let rows = c.query_map(&sql, params![arg], |r| {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                    r.get::<String>(3)?,
                    r.get::<i64>(4)?,
                    r.get::<i64>(5)?,
                    r.get::<String>(6)?,
                    r.get::<Option<String>>(7)?,
                ))
            })?;
            Ok((rows, flagged))
        })
        .await?;
    let (rows, flagged) = rows;
    let mut body = String::from(
        "<table id=\"sessions\"><tr><th>Session</th><th>Machine</th><th>Person</th><th>Team</th>\
         <th>From</th><th>To</th><th>Records</th><th>Refused</th><th>Chain</th></tr>",
    );
    for (machine, session, first, last, n, denied, email, team) in &rows {
        let chain = if flagged.contains(&(machine.clone(), session.clone())) {
            "<span class=\"deny\">flagged</span>"
        } else {
            "intact"
        };
        body.push_str(&format!(
            "<tr><td><a href=\"/ui/sessions/{}/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{n}</td><td class=\"{}\">{denied}</td><td>{chain}</td></tr>",
            seg(machine),
            seg(session),
            esc(session),
            esc(machine),
            esc(email),
            esc(team.as_deref().unwrap_or("")),
            esc(first),
            esc(last),
            if *denied > 0 { "deny" } else { "" },
        ));
    }
    body.push_str("</table>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No session has shipped records yet.</p>");
    }
    Ok(page(&viewer, "Sessions", &body))
}

/// Where a rule's source (`.../org-v3.bundle:9`) is on the dashboard: the
/// version's page, at the line of the policy inside the bundle.
pub(crate) fn rule_href(source: &str) -> Option<String> {
    let (file, line) = source.rsplit_once(':')?;
    let line: usize = line.parse().ok()?;
    let line = line.checked_sub(sbx_policy::UNTIL_HEADER_LINES)?;
    let name = file.rsplit('/').next()?.strip_suffix(".bundle")?;
    let (scope, version) = name.rsplit_once("-v")?;
    let version: u64 = version.parse().ok()?;
    let base = if scope == "org" {
        "/ui/policy/org".to_string()
    } else {
        format!("/ui/policy/teams/{}", seg(scope.strip_prefix("team-")?))
    };
    Some(format!("{base}?v={version}#L{line}"))
}

/// `GET /ui/sessions/{machine}/{session}`: one session's records in order.
pub async fn timeline(
    State(s): State<AppState>,
    viewer: Viewer,
    Path((machine, session)): Path<(String, String)>,
) -> Result<Html<String>, PageError> {
    let (cond, arg) = viewer.caller.audit_scope();
    let (m, se) = (machine.clone(), session.clone());
    let (lines, flags, head) = s
        .db
        .run(move |c| {
            let sql = format!(
                "SELECT a.line FROM audit_records a WHERE a.machine = ?1 AND a.session = ?2 AND {cond} ?3 ORDER BY a.seq"
            );
            let lines = c.query_map(&sql, params![m, se, arg], |r| r.get::<String>(0))?;
            if lines.is_empty() {
                return Err(ApiError::NotFound(format!(
                    "no session `{se}` of machine `{m}` that you may see"
                )));
            }
            let flags = c.query_map(
                "SELECT seq, kind, details FROM audit_flags WHERE machine = ?1 AND session = ?2 ORDER BY seq",
                params![m, se],
                |r| Ok((r.get::<i64>(0)?, r.get::<String>(1)?, r.get::<String>(2)?)),
            )?;
            let head = c.query_opt(
                "SELECT seq, hash FROM audit_heads WHERE machine = ?1 AND session = ?2",
                params![m, se],
                |r| Ok((r.get::<i64>(0)?, r.get::<String>(1)?)),
            )?;
            Ok((lines, flags, head))
        })
        .await?;
    let mut body = String::new();
    if flags.is_empty() {
        let (n, hash) = head.unwrap_or_default();
        body.push_str(&format!(
            "<p class=\"ok\" id=\"chain\">Chain intact: {n} records, each checked on arrival; head <code>{}</code>.</p>",
            esc(&hash)
        ));
    } else {
        for (seq, kind, details) in &flags {
            let why = serde_json::from_str::<Value>(details)
                .ok()
                .and_then(|d| d["why"].as_str().map(str::to_string))
                .unwrap_or_default();
            body.push_str(&format!(
                "<p class=\"flag\" id=\"chain\">Record {seq}: <strong>{}</strong>: {}</p>",
                esc(kind),
                esc(&why)
            ));
        }
    }
    body.push_str(
        "<table id=\"timeline\"><tr><th>#</th><th>Time</th><th>What</th><th>On</th>\
         <th>Decision</th><th>Rule</th><th>Details</th></tr>",
    );
    for line in &lines {
        let Ok(r) = serde_json::from_str::<sbx_audit::Record>(line) else {
            continue;
        };
        let e = &r.event;
        let decision = e.decision.as_deref().unwrap_or("");
        let rule = match (&e.rule_id, &e.rule_source) {
            (Some(id), Some(src)) => {
                // The machine's path of a served bundle says nothing here.
                let shown = src.rsplit('/').next().unwrap_or(src);
                let at = format!(
                    "{} ({} layer, {})",
                    esc(id),
                    esc(e.layer.as_deref().unwrap_or("")),
                    esc(shown)
                );
                match rule_href(src) {
                    Some(href) => format!("<a class=\"rule\" href=\"{}\">{at}</a>", esc(&href)),
                    None => at,
                }
            }
            (Some(id), None) => esc(id),
            _ => String::new(),
        };
        let mut details = if e.details.is_null() {
            String::new()
        } else {
            e.details.to_string()
        };
        if let Some(reason) = &e.reason {
            details = format!("{reason} {details}");
        }
        if details.len() > 240 {
            let mut cut = 240;
            while !details.is_char_boundary(cut) {
                cut -= 1;
            }
            details.truncate(cut);
            details.push('…');
        }
        body.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td class=\"{}\">{}</td><td>{rule}</td><td>{}</td></tr>",
            esc(decision),
            r.seq,
            esc(&r.ts),
            esc(e.surface.as_deref().unwrap_or(r.category.as_str())),
            esc(&e.action),
            esc(&e.resource),
            esc(decision),
            esc(decision),
            esc(&details),
        ));
    }
    body.push_str("</table>");
    let title = format!("Session {session} on {machine}");
    Ok(page(&viewer, &title, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_served_bundles_rule_links_to_its_version_and_line() {
        assert_eq!(
            rule_href("/home/bob/.config/sbx/managed/org-v3.bundle:9").as_deref(),
            Some("/ui/policy/org?v=3#L4")
        );
        assert_eq!(
            rule_href("managed/team-web-api-v12.bundle:7").as_deref(),
            Some("/ui/policy/teams/web-api?v=12#L2")
        );
        assert_eq!(rule_href(".sbx/policy.toml:3"), None);
        assert_eq!(rule_href("builtin"), None);
    }
}
