//! SIEM delivery: every audit record the server holds, pushed as it
//! arrives to syslog (RFC 5424 messages over TCP with TLS, framed by octet
//! counting as RFC 5425 says) and to an OpenTelemetry collector (OTLP logs
//! over HTTP, JSON), at least once. Each sink's cursor (the last record it
//! took) is kept in the database and moves only once a batch is through,
//! so an outage or a restart resumes where delivery stopped; a sink is
//! leased while it sends, so instances sharing a database do not send the
//! same batch at once. A failing sink is tried again after 1, 2, 4...
//! seconds, at most a minute apart.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::db::{self, params, Tx};
use crate::error::ApiError;
use crate::AppState;

/// Where records go besides the pull API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Siem {
    /// `HOST:PORT` of a syslog receiver that speaks TLS (RFC 5425).
    pub syslog: Option<String>,
    /// A PEM CA to trust for the syslog receiver, besides the host's roots.
    pub syslog_ca: Option<PathBuf>,
    /// An OTLP/HTTP logs endpoint (`https://collector:4318/v1/logs`).
    pub otlp: Option<String>,
}

/// Records per batch.
const BATCH: i64 = 500;
/// How long a sink stays leased to the instance sending its batch.
const LEASE: i64 = 30;
const MAX_BACKOFF: i64 = 60;
/// Records are taken once they are this many seconds old: on PostgreSQL,
/// instances ingesting at once may commit ids out of order, and a cursor
/// that passed a later id would skip an earlier one committed after it.
const SETTLE: i64 = 2;
/// syslog's "log audit" facility (13), as the PRI's high part.
const FACILITY: u8 = 13 * 8;
/// The structured data's ID: sbx's parameters (32473 is the private
/// enterprise number IANA keeps for examples; sbx has none of its own).
const SD_ID: &str = "sbx@32473";

/// One stored record, with what the server knows of its sender.
#[derive(Clone, Debug)]
struct Row {
    id: i64,
    machine: String,
    session: String,
    seq: i64,
    ts: String,
    surface: Option<String>,
    action: String,
    decision: Option<String>,
    line: String,
    user: Option<String>,
    team: Option<String>,
    /// The record's own fields, read from its line once.
    rule_id: Option<String>,
    resource: Option<String>,
    hash: Option<String>,
}

impl Row {
    fn refused(&self) -> bool {
        self.decision.as_deref().is_some_and(|d| d != "allow")
    }
}

/// A place records go.
enum Sink<'a> {
    /// `HOST:PORT`.
    Syslog(&'a str),
    /// The logs endpoint's URL.
    Otlp(&'a str),
}

impl Sink<'_> {
    /// The key its cursor is kept under.
    fn key(&self) -> String {
        match self {
            Sink::Syslog(a) => format!("syslog {a}"),
            Sink::Otlp(u) => format!("otlp {u}"),
        }
    }
}

/// The sinks `siem` names.
fn sinks(siem: &Siem) -> Vec<Sink<'_>> {
    let syslog = siem.syslog.as_deref().map(Sink::Syslog);
    let otlp = siem.otlp.as_deref().map(Sink::Otlp);
    syslog.into_iter().chain(otlp).collect()
}

/// Leases `sink` and returns the records after its cursor; None while
/// another instance holds it or it waits to be tried again.
fn take(c: &mut Tx<'_>, sink: &str) -> Result<Option<Vec<Row>>, ApiError> {
    c.serialize(&format!("siem/{sink}"))?;
    let now = db::now();
    c.execute(
        "INSERT INTO siem_cursors (sink, cursor, leased_until, failures, delivered)
         VALUES (?1, 0, 0, 0, 0) ON CONFLICT(sink) DO NOTHING",
        params![sink],
    )?;
    let (cursor, leased): (i64, i64) = c.query_one(
        "SELECT cursor, leased_until FROM siem_cursors WHERE sink = ?1",
        params![sink],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if leased > now {
        return Ok(None);
    }
    let rows = c.query_map(
        "SELECT a.id, a.machine, a.session, a.seq, a.ts, a.surface, a.action, a.decision, a.line,
                u.email, t.name
         FROM audit_records a LEFT JOIN users u ON u.id = a.user_id LEFT JOIN teams t ON t.id = a.team_id
         WHERE a.id > ?1 AND a.received <= ?3 ORDER BY a.id LIMIT ?2",
        params![cursor, BATCH, now - SETTLE],
        |r| {
            let line: String = r.get(8)?;
            let fields = serde_json::from_str::<Value>(&line).unwrap_or_default();
            let field = |name: &str| fields[name].as_str().map(str::to_string);
            Ok(Row {
                rule_id: field("rule_id"),
                resource: field("resource"),
                hash: field("hash"),
                id: r.get(0)?,
                machine: r.get(1)?,
                session: r.get(2)?,
                seq: r.get(3)?,
                ts: r.get(4)?,
                surface: r.get(5)?,
                action: r.get(6)?,
                decision: r.get(7)?,
                line,
                user: r.get(9)?,
                team: r.get(10)?,
            })
        },
    )?;
    if !rows.is_empty() {
        c.execute(
            "UPDATE siem_cursors SET leased_until = ?1 WHERE sink = ?2",
            params![now + LEASE, sink],
        )?;
    }
    Ok(Some(rows))
}

/// Records how sending the batch that ends at `last` went.
fn settle(
    c: &mut Tx<'_>,
    sink: &str,
    last: i64,
    n: i64,
    outcome: &Result<(), String>,
) -> Result<(), ApiError> {
    let now = db::now();
    match outcome {
        Ok(()) => c
            .execute(
                "UPDATE siem_cursors SET cursor = ?1, delivered = delivered + ?2, leased_until = 0,
                 failures = 0, last_ok = ?3, last_error = NULL WHERE sink = ?4 AND cursor < ?1",
                params![last, n, now, sink],
            )
            .map(drop),
        Err(e) => {
            let failures: i64 = c.query_one(
                "SELECT failures FROM siem_cursors WHERE sink = ?1",
                params![sink],
                |r| r.get(0),
            )?;
            let wait = (1i64 << failures.min(6)).min(MAX_BACKOFF);
            c.execute(
                "UPDATE siem_cursors SET leased_until = ?1, failures = failures + 1, last_error = ?2
                 WHERE sink = ?3",
                params![now + wait, e.as_str(), sink],
            )
            .map(drop)
        }
    }
}

/// The worker; runs until the server stops.
pub async fn run(state: AppState) {
    let siem = state.config.siem.clone();
    let sinks = sinks(&siem);
    if sinks.is_empty() {
        return;
    }
    let tls = match siem_tls(&siem) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("records will not reach syslog: {e}");
            return;
        }
    };
    let http = match crate::deliver::client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("records will not reach the OTLP collector: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = state.records.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for sink in &sinks {
            let key = sink.key();
            // A full batch is followed at once by the next.
            loop {
                let k = key.clone();
                let rows = match state.db.run(move |c| take(c, &k)).await {
                    Ok(Some(rows)) if !rows.is_empty() => rows,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("cannot read records for {key}: {e}");
                        break;
                    }
                };
                let outcome = match sink {
                    Sink::Syslog(addr) => send_syslog(addr, &tls, &rows).await,
                    Sink::Otlp(url) => send_otlp(&http, url, &rows).await,
                };
                if let Err(e) = &outcome {
                    tracing::warn!("records to {key}: {e}; trying again");
                }
                let (last, n) = (rows.last().map_or(0, |r| r.id), rows.len() as i64);
                let ok = outcome.is_ok();
                let k = key.clone();
                if let Err(e) = state
                    .db
                    .run(move |c| settle(c, &k, last, n, &outcome))
                    .await
                {
                    tracing::warn!("cannot record delivery to {key}: {e}");
                    break;
                }
                if !ok || n < BATCH {
                    break;
                }
            }
        }
    }
}

fn siem_tls(siem: &Siem) -> Result<Arc<rustls::ClientConfig>, String> {
    let extra: Vec<&std::path::Path> = siem.syslog_ca.iter().map(|p| p.as_path()).collect();
    sbx_egress::mitm::upstream_config(&extra).map_err(|e| e.to_string())
}

/// Characters syslog's header fields may hold: printable ASCII, no space.
fn header_word(s: &str, max: usize) -> String {
    let w: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if w.is_empty() {
        "-".into()
    } else {
        w
    }
}

/// A structured-data parameter's value, escaped as RFC 5424 says.
fn sd_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One record as an RFC 5424 message: the record's time, the machine as
/// the host, its action as the message ID, who and what as structured
/// data, and the record's own line (hash and all) as the message.
fn syslog_message(r: &Row) -> String {
    let severity = if r.refused() { 4 } else { 5 };
    let mut sd = format!("[{SD_ID}");
    for (k, v) in [
        ("machine", Some(r.machine.clone())),
        ("session", Some(r.session.clone())),
        ("seq", Some(r.seq.to_string())),
        ("user", r.user.clone()),
        ("team", r.team.clone()),
        ("surface", r.surface.clone()),
        ("decision", r.decision.clone()),
        ("rule", r.rule_id.clone()),
        ("resource", r.resource.clone()),
    ] {
        if let Some(v) = v {
            sd.push_str(&format!(" {k}=\"{}\"", sd_value(&v)));
        }
    }
    sd.push(']');
    format!(
        "<{}>1 {} {} sbx - {} {sd} {}",
        FACILITY + severity,
        header_word(&r.ts, 48),
        header_word(&r.machine, 255),
        header_word(&r.action, 32),
        r.line
    )
}

/// RFC 5425's framing: the message's length in bytes, a space, the message.
fn frame(message: &str) -> String {
    format!("{} {message}", message.len())
}

async fn send_syslog(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    rows: &[Row],
) -> Result<(), String> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let io = |e: io::Error| format!("{addr}: {e}");
    let send = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let mut s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(io)?;
        let mut out = String::new();
        for r in rows {
            out.push_str(&frame(&syslog_message(r)));
        }
        s.write_all(out.as_bytes()).await.map_err(io)?;
        s.flush().await.map_err(io)?;
        // TLS's close_notify: the receiver has everything once it reads it.
        s.shutdown().await.map_err(io)
    };
    tokio::time::timeout(Duration::from_secs(20), send)
        .await
        .map_err(|_| format!("{addr}: no answer within 20 s"))?
}

/// An OTLP attribute.
fn attr(key: &str, value: Value) -> Value {
    let v = match value {
        Value::Number(n) => json!({ "intValue": n.to_string() }),
        Value::String(s) => json!({ "stringValue": s }),
        other => json!({ "stringValue": other.to_string() }),
    };
    json!({ "key": key, "value": v })
}

/// The records as one OTLP `ExportLogsServiceRequest` (JSON): the record's
/// time, WARN for refusals and INFO otherwise, its line as the body, and
/// its fields as attributes (`sbx.*`, `user.email`, `host.name`).
fn otlp_body(rows: &[Row]) -> Value {
    let records: Vec<Value> = rows
        .iter()
        .map(|r| {
            let nanos =
                time::OffsetDateTime::parse(&r.ts, &time::format_description::well_known::Rfc3339)
                    .map_or(0, |t| t.unix_timestamp_nanos());
            let (number, text) = if r.refused() {
                (13, "WARN")
            } else {
                (9, "INFO")
            };
            let mut attributes = vec![
                attr("host.name", json!(r.machine)),
                attr("sbx.machine", json!(r.machine)),
                attr("sbx.session", json!(r.session)),
                attr("sbx.seq", json!(r.seq)),
                attr("sbx.action", json!(r.action)),
            ];
            let optional = [
                ("user.email", r.user.clone()),
                ("sbx.team", r.team.clone()),
                ("sbx.surface", r.surface.clone()),
                ("sbx.decision", r.decision.clone()),
                ("sbx.rule_id", r.rule_id.clone()),
                ("sbx.resource", r.resource.clone()),
                ("sbx.hash", r.hash.clone()),
            ];
            for (k, v) in optional {
                if let Some(v) = v {
                    attributes.push(attr(k, json!(v)));
                }
            }
            json!({
                "timeUnixNano": nanos.to_string(),
                "observedTimeUnixNano": (db::now() as i128 * 1_000_000_000).to_string(),
                "severityNumber": number,
                "severityText": text,
                "body": { "stringValue": r.line },
                "attributes": attributes,
            })
        })
        .collect();
    json!({
        "resourceLogs": [{
            "resource": { "attributes": [attr("service.name", json!("sbx"))] },
            "scopeLogs": [{ "scope": { "name": "sbx.audit" }, "logRecords": records }],
        }]
    })
}

async fn send_otlp(client: &reqwest::Client, url: &str, rows: &[Row]) -> Result<(), String> {
    let r = client
        .post(url)
        .json(&otlp_body(rows))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url}: {}", r.status()))
    }
}

/// Each sink's state, for `GET /api/v1/siem`.
pub fn status(c: &mut Tx<'_>, siem: &Siem) -> Result<Value, ApiError> {
    let newest: i64 = c.query_one(
        "SELECT COALESCE(MAX(id), 0) FROM audit_records",
        params![],
        |r| r.get(0),
    )?;
    let mut out = Vec::new();
    for key in sinks(siem).iter().map(Sink::key) {
        let row = c.query_opt(
            "SELECT cursor, delivered, last_ok, last_error FROM siem_cursors WHERE sink = ?1",
            params![key],
            |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<i64>(1)?,
                    r.get::<Option<i64>>(2)?,
                    r.get::<Option<String>>(3)?,
                ))
            },
        )?;
        let (cursor, delivered, last_ok, last_error) = row.unwrap_or((0, 0, None, None));
        let pending: i64 = c.query_one(
            "SELECT COUNT(*) FROM audit_records WHERE id > ?1",
            params![cursor],
            |r| r.get(0),
        )?;
        out.push(json!({
            "sink": key, "delivered": delivered, "pending": pending,
            "last_ok": last_ok, "last_error": last_error,
        }));
    }
    Ok(json!({ "sinks": out, "newest": newest }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(decision: Option<&str>) -> Row {
        Row {
            id: 7,
            machine: "bob laptop".into(),
            session: "s-1".into(),
            seq: 3,
            ts: "2026-12-07T10:00:00.5Z".into(),
            surface: Some("network".into()),
            action: "connect".into(),
            decision: decision.map(str::to_string),
            line: r#"{"rule_id":"no-paste","resource":"paste.test:443 \"]"}"#.into(),
            user: Some("bob@acme.example".into()),
            team: None,
            rule_id: Some("no-paste".into()),
            resource: Some("paste.test:443 \"]".into()),
            hash: None,
        }
    }

    #[test]
    fn a_record_becomes_an_rfc5424_message() {
        let m = syslog_message(&row(Some("deny")));
        assert!(
            m.starts_with("<108>1 2026-12-07T10:00:00.5Z bob_laptop sbx - connect [sbx@32473 machine=\"bob laptop\" session=\"s-1\" seq=\"3\" user=\"bob@acme.example\" surface=\"network\" decision=\"deny\" rule=\"no-paste\" resource=\"paste.test:443 \\\"\\]\"] {"),
            "{m}"
        );
        assert!(syslog_message(&row(Some("allow"))).starts_with("<109>1 "));
        assert_eq!(frame("héllo"), "6 héllo");
    }

    #[test]
    fn a_record_becomes_an_otlp_log_record() {
        let body = otlp_body(&[row(Some("deny"))]);
        let r = &body["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(r["severityNumber"], 13);
        assert_eq!(r["timeUnixNano"], "1796637600500000000");
        let attrs = r["attributes"].as_array().unwrap();
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        assert_eq!(get("sbx.rule_id").unwrap()["stringValue"], "no-paste");
        assert_eq!(get("sbx.seq").unwrap()["intValue"], "3");
        assert!(get("sbx.team").is_none());
    }
}
