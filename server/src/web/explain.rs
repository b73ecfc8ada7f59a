//! "Explain": a person picks a team and describes a request (a host and
//! port, a guest path, an MCP tool with its arguments, a secret sent to a
//! host, a command); the page shows what the org policy and that team's,
//! at their latest versions, decide, and every rule that matched, each
//! linked to its line. Asked through `sbx_policy::Policy::explain`, as
//! `sbx policy explain` asks, so both answer alike. A GET form: it
//! changes nothing.

use axum::extract::{Query, State};
use axum::response::Html;
use serde::Deserialize;

use super::{esc, page, seg, PageError, Viewer};
use crate::auth::Caller;
use crate::db::{params, Tx};
use crate::error::ApiError;
use crate::routes::policy as api;
use crate::AppState;

#[derive(Deserialize, Default)]
pub struct Ask {
    /// The team whose policy joins the org's; empty: none.
    #[serde(default)]
    team: String,
    /// net, fs, mcp, credential or exec.
    #[serde(default)]
    kind: String,
    /// The request: HOST:PORT, a path, SERVER.TOOL, a host, a command.
    #[serde(default)]
    q: String,
    /// fs: read or write. credential: the secret's name. mcp: the
    /// arguments as a JSON object.
    #[serde(default)]
    detail: String,
    /// A preset instead of the one the policies name.
    #[serde(default)]
    preset: String,
}

const KINDS: [(&str, &str, &str); 5] = [
    ("net", "a connection", "api.github.com:443"),
    ("fs", "a guest path", "/workspace/.env"),
    ("mcp", "an MCP tool call", "github.get_issue"),
    ("credential", "a secret sent to a host", "api.anthropic.com"),
    ("exec", "a command", "curl"),
];

/// The teams `caller` may explain for.
fn teams(c: &mut Tx<'_>, caller: &Caller) -> Result<Vec<String>, ApiError> {
    let all: Vec<String> = c.query_map("SELECT name FROM teams ORDER BY name", params![], |r| {
        r.get(0)
    })?;
    Ok(all
        .into_iter()
        .filter(|t| super::policy::may_see(caller, t).is_ok())
        .collect())
}

/// The question `ask` puts, or what is wrong with it.
fn question(ask: &Ask) -> Result<sbx_policy::Question, String> {
    use sbx_policy::Question;
    let q = ask.q.trim().to_string();
    let detail = ask.detail.trim();
    Ok(match ask.kind.as_str() {
        "net" => Question::Net {
            target: q,
            resolved: None,
        },
        "fs" => Question::Fs {
            path: q,
            access: match detail {
                "" | "read" => sbx_policy::Access::Read,
                "write" => sbx_policy::Access::Write,
                other => return Err(format!("access `{other}`: use read or write")),
            },
        },
        "mcp" => Question::Mcp {
            call: q,
            args: (!detail.is_empty()).then(|| detail.to_string()),
        },
        "credential" => {
            if detail.is_empty() {
                return Err("name the secret (such as ANTHROPIC_API_KEY)".into());
            }
            Question::Credential {
                secret: detail.to_string(),
                host: q,
            }
        }
        "exec" => Question::Exec { command: q },
        other => return Err(format!("`{other}` is not a kind of request")),
    })
}

/// Where the rule at `file:line` is on the dashboard, for the sources
/// named by [`answer`] (`org-vN`, `team-NAME-vN`).
fn rule_href(file: &str, line: usize) -> Option<String> {
    let (scope, version) = file.rsplit_once("-v")?;
    let version: u64 = version.parse().ok()?;
    let base = match scope.strip_prefix("team-") {
        Some(team) => format!("/ui/policy/teams/{}", seg(team)),
        None if scope == "org" => "/ui/policy/org".into(),
        None => return None,
    };
    Some(format!("{base}?v={version}#L{line}"))
}

fn rule_cell(r: &sbx_policy::RuleInfo) -> String {
    let at = format!("{}:{}", r.location.file, r.location.line);
    let place = match rule_href(&r.location.file, r.location.line) {
        Some(href) => format!("<a href=\"{}\">{}</a>", esc(&href), esc(&at)),
        None => esc(&at),
    };
    format!(
        "<td>{}</td><td><code>{}</code></td><td>{}</td><td>{place}</td><td>{}</td>",
        r.action.as_str(),
        esc(&r.id),
        r.layer.as_str(),
        esc(&r.summary)
    )
}

/// The answer, as HTML, to `ask` under the org's policy and `team`'s
/// (their texts and versions).
fn answer(
    ask: &Ask,
    org: Option<(i64, String)>,
    team: Option<(i64, String)>,
) -> Result<String, String> {
    let question = question(ask)?;
    let mut b = sbx_policy::PolicyBuilder::new();
    if !ask.preset.is_empty() {
        b.preset(&ask.preset).map_err(|e| e.to_string())?;
    }
    if let Some((v, text)) = &org {
        b.add_text(&format!("org-v{v}"), text)
            .map_err(|e| e.to_string())?;
    }
    if let Some((v, text)) = &team {
        b.add_text(&format!("team-{}-v{v}", ask.team), text)
            .map_err(|e| e.to_string())?;
    }
    let policy = b.build().map_err(|e| e.to_string())?;
    let a = policy.explain(&question).map_err(|e| e.to_string())?;
    let d = &a.decision;
    let class = if d.allowed() { "allow" } else { "deny" };
    let mut out = format!(
        "<div id=\"answer\" class=\"{}\"><p><span id=\"outcome\" class=\"{class}\">{}</span>: {} {}</p>",
        if d.allowed() { "ok" } else { "flag" },
        d.outcome(),
        a.surface,
        esc(&a.request),
    );
    out.push_str(&format!(
        "<p>Decided by <code id=\"rule\">{}</code> ({} layer, {}): {}</p></div>",
        esc(&d.rule.id),
        d.rule.layer.as_str(),
        d.mode().as_str(),
        esc(&d.reason)
    ));
    out.push_str("<h2>Rules that matched, most senior first</h2>");
    if d.matched.is_empty() {
        out.push_str("<p class=\"muted\">None: the default applies.</p>");
    } else {
        out.push_str(
            "<table id=\"matched\"><tr><th>Action</th><th>Rule</th><th>Layer</th><th>Where</th><th>Matches</th></tr>",
        );
        for r in &d.matched {
            out.push_str(&format!("<tr>{}</tr>", rule_cell(r)));
        }
        out.push_str("</table>");
    }
    out.push_str(&format!(
        "<p class=\"muted\">Org policy {}, team policy {}, preset {}; a machine's own project and local policy may add to them.</p>",
        org.map_or("none".into(), |(v, _)| format!("v{v}")),
        team.map_or("none".into(), |(v, _)| format!("v{v}")),
        esc(policy.preset_name()),
    ));
    Ok(out)
}

fn form(ask: &Ask, teams: &[String]) -> String {
    let option = |value: &str, label: &str, chosen: &str| {
        format!(
            "<option value=\"{}\"{}>{}</option>",
            esc(value),
            if value == chosen { " selected" } else { "" },
            esc(label)
        )
    };
    let mut team_opts = option("", "(no team)", &ask.team);
    for t in teams {
        team_opts.push_str(&option(t, &format!("team {t}"), &ask.team));
    }
    let kinds: String = KINDS
        .iter()
        .map(|(k, label, _)| option(k, label, &ask.kind))
        .collect();
    let mut presets = option("", "(as the policies say)", &ask.preset);
    for p in sbx_policy::PRESETS {
        presets.push_str(&option(p, p, &ask.preset));
    }
    let example = KINDS
        .iter()
        .find(|(k, ..)| *k == ask.kind)
        .map_or(KINDS[0].2, |(.., e)| e);
    format!(
        r#"<form method="get" id="ask"><p>
<label>Team <select name="team" id="team">{team_opts}</select></label>
<label>Request <select name="kind" id="kind">{kinds}</select></label>
<input name="q" id="q" size="40" value="{q}" placeholder="{example}">
<input name="detail" id="detail" size="30" value="{detail}" placeholder="fs: read|write; credential: SECRET; mcp: {{&quot;arg&quot;: 1}}">
<label>Preset <select name="preset">{presets}</select></label>
<button id="go">Explain</button></p></form>"#,
        q = esc(&ask.q),
        detail = esc(&ask.detail),
    )
}

/// `GET /ui/policy/explain`.
pub async fn show(
    State(s): State<AppState>,
    viewer: Viewer,
    Query(ask): Query<Ask>,
) -> Result<Html<String>, PageError> {
    let caller = viewer.caller.clone();
    let team = ask.team.clone();
    let (teams, org, team_policy) =
        s.db.run(move |c| {
            let teams = teams(c, &caller)?;
            if !team.is_empty() && !teams.contains(&team) {
                return Err(ApiError::Forbidden(format!(
                    "team `{team}`'s policy is for its people, org admins and auditors"
                )));
            }
            let org = api::latest(c, "org", None)?;
            let team_id: Option<i64> = if team.is_empty() {
                None
            } else {
                c.query_opt("SELECT id FROM teams WHERE name = ?1", params![team], |r| {
                    r.get(0)
                })?
            };
            let team_policy = match team_id {
                Some(id) => api::latest(c, "team", Some(id))?,
                None => None,
            };
            Ok((teams, org, team_policy))
        })
        .await?;
    let mut body = form(&ask, &teams);
    if !ask.q.trim().is_empty() {
        match answer(&ask, org, team_policy) {
            Ok(html) => body.push_str(&html),
            Err(e) => body.push_str(&format!("<p id=\"answer\" class=\"flag\">{}</p>", esc(&e))),
        }
    }
    Ok(page(&viewer, "Explain a decision", &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_link_to_their_version_and_line() {
        assert_eq!(
            rule_href("org-v3", 7).as_deref(),
            Some("/ui/policy/org?v=3#L7")
        );
        assert_eq!(
            rule_href("team-web-api-v12", 2).as_deref(),
            Some("/ui/policy/teams/web-api?v=12#L2")
        );
        assert_eq!(rule_href("preset balanced", 4), None);
        assert_eq!(rule_href("builtin", 0), None);
    }

    #[test]
    fn a_question_names_what_is_missing() {
        let ask = |kind: &str, detail: &str| Ask {
            kind: kind.into(),
            q: "x".into(),
            detail: detail.into(),
            ..Ask::default()
        };
        assert!(question(&ask("credential", ""))
            .unwrap_err()
            .contains("secret"));
        assert!(question(&ask("fs", "append"))
            .unwrap_err()
            .contains("read or write"));
        assert!(question(&ask("dns", "")).is_err());
        assert!(question(&ask("fs", "write")).is_ok());
    }
}
