//! The overview: over a chosen period, how many sessions ran on how many
//! machines for how many people (and which still are), decisions over
//! time by surface, what was refused most, and the alerts that matter
//! most (exfiltration attempts, rug pulls, tampered logs).

use axum::extract::{Query, State};
use axum::response::Html;
use serde::Deserialize;

use super::{esc, page, PageError, Viewer};
use crate::db::params;
use crate::AppState;

#[derive(Deserialize)]
pub struct Period {
    /// 1, 7 or 30.
    days: Option<u32>,
}

/// One surface's decisions in one time bucket.
struct Count {
    bucket: String,
    surface: String,
    allowed: i64,
    denied: i64,
}

/// `GET /ui/overview`.
pub async fn show(
    State(s): State<AppState>,
    viewer: Viewer,
    Query(p): Query<Period>,
) -> Result<Html<String>, PageError> {
    let days = p.days.filter(|d| [1, 7, 30].contains(d)).unwrap_or(7);
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let since = fmt(now - time::Duration::days(i64::from(days)));
    let recent = fmt(now - time::Duration::minutes(10));
    // A day's buckets are hours; longer periods' are days.
    let width: i64 = if days == 1 { 13 } else { 10 };
    let (cond, arg) = viewer.caller.audit_scope();
    let caller = viewer.caller.clone();
    let data = s
        .db
        .run(move |c| {
            let w = |sql: &str| sql.replace("{cond}", &format!("{cond} ?2"));
            let totals = c.query_one(
                &w("SELECT COUNT(*), COUNT(DISTINCT a.machine), COUNT(DISTINCT a.user_id),
                           CAST(COALESCE(SUM(a.records), 0) AS BIGINT)
                    FROM audit_sessions a WHERE a.last_ts >= ?1 AND {cond}"),
                params![since, arg],
                |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?, r.get::<i64>(3)?)),
            )?;
            // Running: a record in the last ten minutes, and no stop yet.
            let running = c.query_one(
                &w("SELECT COUNT(*) FROM audit_sessions a WHERE a.last_ts >= ?1 AND a.stopped = 0 AND {cond}"),
                params![recent, arg],
                |r| r.get::<i64>(0),
            )?;
            let counts = c.query_map(
                &w("SELECT substr(a.hour, 1, ?3), a.surface,
                           CAST(SUM(a.allowed) AS BIGINT), CAST(SUM(a.denied) AS BIGINT)
                    FROM audit_counts a WHERE a.hour >= substr(?1, 1, 13) AND {cond}
                    GROUP BY substr(a.hour, 1, ?3), a.surface ORDER BY 1"),
                params![since, arg, width],
                |r| {
                    Ok(Count {
                        bucket: r.get(0)?,
                        surface: r.get(1)?,
                        allowed: r.get(2)?,
                        denied: r.get(3)?,
                    })
                },
            )?;
            let refused = c.query_map(
                &w("SELECT a.surface, a.resource, CAST(SUM(a.n) AS BIGINT) FROM audit_refusals a
                    WHERE a.day >= substr(?1, 1, 10) AND {cond}
                    GROUP BY a.surface, a.resource ORDER BY 3 DESC, 2 LIMIT 15"),
                params![since, arg],
                |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?)),
            )?;
            let alerts = crate::alerts::list(c, &caller)?;
            Ok((totals, running, counts, refused, alerts))
        })
        .await?;
    let ((sessions, machines, people, records), running, counts, refused, alerts) = data;

    let mut body = String::new();
    body.push_str("<p>");
    for d in [1, 7, 30] {
        if d == days {
            body.push_str(&format!(
                "<strong>{d} day{}</strong> ",
                if d == 1 { "" } else { "s" }
            ));
        } else {
            body.push_str(&format!(
                "<a href=\"/ui/overview?days={d}\">{d} day{}</a> ",
                if d == 1 { "" } else { "s" }
            ));
        }
    }
    body.push_str("</p>");
    body.push_str(&format!(
        "<table id=\"totals\"><tr><th>Running now</th><th>Sessions</th><th>Machines</th><th>People</th><th>Records</th></tr>\
         <tr><td>{running}</td><td>{sessions}</td><td>{machines}</td><td>{people}</td><td>{records}</td></tr></table>"
    ));

    // What matters most first.
    let loud: Vec<_> = alerts
        .iter()
        .filter(|a| a["at"].as_i64().unwrap_or(0) >= now.unix_timestamp() - i64::from(days) * 86400)
        .collect();
    if !loud.is_empty() {
        body.push_str("<h2>Alerts</h2><div id=\"loud\">");
        for a in loud.iter().take(10) {
            body.push_str(&format!(
                "<p class=\"flag\"><strong>{}</strong> on {} (session {}) by {}: {} <a href=\"/ui/alerts\">alerts</a></p>",
                esc(a["kind"].as_str().unwrap_or("")),
                esc(a["machine"].as_str().unwrap_or("")),
                esc(a["session"].as_str().unwrap_or("")),
                esc(a["user"].as_str().unwrap_or("?")),
                esc(a["summary"].as_str().unwrap_or("")),
            ));
        }
        body.push_str("</div>");
    }

    body.push_str("<h2>Decisions by surface</h2>");
    body.push_str(&chart(&counts));

    body.push_str("<h2>Refused most</h2><table id=\"refused\"><tr><th>Surface</th><th>What</th><th>Times</th></tr>");
    for (surface, resource, n) in &refused {
        body.push_str(&format!(
            "<tr><td>{}</td><td class=\"deny\">{}</td><td>{n}</td></tr>",
            esc(surface),
            esc(resource)
        ));
    }
    body.push_str("</table>");
    Ok(page(&viewer, "Overview", &body))
}

/// Stacked bars per time bucket: allowed below, refused above, one row of
/// bars per surface. Plain SVG, nothing to load.
fn chart(counts: &[Count]) -> String {
    let mut surfaces: Vec<&str> = counts.iter().map(|c| c.surface.as_str()).collect();
    surfaces.sort();
    surfaces.dedup();
    let mut buckets: Vec<&str> = counts.iter().map(|c| c.bucket.as_str()).collect();
    buckets.sort();
    buckets.dedup();
    if buckets.is_empty() {
        return "<p class=\"muted\" id=\"chart\">No decisions in this period.</p>".into();
    }
    let max = counts
        .iter()
        .map(|c| c.allowed + c.denied)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (bar, gap, height, label) = (14.0, 4.0, 60.0, 90.0);
    let width = label + buckets.len() as f64 * (bar + gap);
    let mut svg = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" role=\"img\">",
        surfaces.len() as f64 * (height + 20.0) + 20.0
    );
    for (row, surface) in surfaces.iter().enumerate() {
        let top = row as f64 * (height + 20.0) + 10.0;
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>",
            top + height / 2.0,
            esc(if surface.is_empty() { "other" } else { surface })
        ));
        for (i, bucket) in buckets.iter().enumerate() {
            let Some(c) = counts
                .iter()
                .find(|c| c.surface == *surface && c.bucket == *bucket)
            else {
                continue;
            };
            let x = label + i as f64 * (bar + gap);
            let a = c.allowed as f64 / max * height;
            let d = c.denied as f64 / max * height;
            svg.push_str(&format!(
                "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{a}\" fill=\"#1b7f3b\"><title>{} {}: {} allowed</title></rect>\
                 <rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{d}\" fill=\"#b00020\"><title>{} {}: {} refused</title></rect>",
                top + height - a,
                esc(surface),
                esc(bucket),
                c.allowed,
                top + height - a - d,
                esc(surface),
                esc(bucket),
                c.denied,
            ));
        }
    }
    svg.push_str("</svg>");
    svg.push_str(&format!(
        "<p class=\"muted\">{} to {}, one bar each {}: allowed in green, refused in red.</p>",
        esc(buckets[0]),
        esc(buckets[buckets.len() - 1]),
        if buckets[0].len() > 10 { "hour" } else { "day" }
    ));
    svg
}
