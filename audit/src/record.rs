//! One audit record: a JSON object on one line, chained to the one before
//! by a SHA-256 hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when a field changes meaning; readers refuse schemas they do not know.
pub const SCHEMA: &str = "sbx.audit/1";

/// The `prev` of a log's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A policy decision.
    Decision,
    /// Something the guest did or reported.
    Guest,
    /// The session's own life: start, stop, failure.
    Session,
    /// An administrative action on the control plane (people, tokens,
    /// policy), in the server's own chained log.
    Admin,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Decision => "decision",
            Category::Guest => "guest",
            Category::Session => "session",
            Category::Admin => "admin",
        }
    }
}

/// What the caller says happened; the log adds identity, time and chain.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub surface: Option<String>,
    /// What was attempted: `connect`, `read`, `call`, `exec`, `start`...
    pub action: String,
    /// What it was attempted on: `host:port`, a path, `server.tool`...
    pub resource: String,
    /// `allow`, `deny` or `audit-deny`, for decisions.
    pub decision: Option<String>,
    pub rule_id: Option<String>,
    pub layer: Option<String>,
    /// The rule's file and line.
    pub rule_source: Option<String>,
    pub reason: Option<String>,
    /// `enforce` or `audit`.
    pub mode: Option<String>,
    /// Anything else worth keeping (argv, exit code...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub schema: String,
    /// 1 for a log's first record, then one more each time.
    pub seq: u64,
    /// Unique across logs: the session and the sequence number.
    pub id: String,
    /// RFC 3339, UTC, microseconds.
    pub ts: String,
    pub category: Category,
    pub session: String,
    pub user: String,
    pub host: String,
    #[serde(flatten)]
    pub event: Event,
    /// The hash of the record before this one ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 of this line up to (not including) `,"hash":`, plus `}`.
    #[serde(default)]
    pub hash: String,
}

const HASH_KEY: &str = ",\"hash\":\"";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Record {
    /// The JSON line for this record, with `hash` filled in.
    pub(crate) fn seal(&mut self) -> String {
        self.hash.clear();
        let mut body = serde_json::to_string(&RecordBody(self)).expect("records serialise");
        self.hash = hex(&Sha256::digest(body.as_bytes()));
        body.pop();
        body.push_str(HASH_KEY);
        body.push_str(&self.hash);
        body.push_str("\"}");
        body
    }
}

/// A record without its hash, as it is hashed.
struct RecordBody<'a>(&'a Record);

impl Serialize for RecordBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Body<'a> {
            schema: &'a str,
            seq: u64,
            id: &'a str,
            ts: &'a str,
            category: Category,
            session: &'a str,
            user: &'a str,
            host: &'a str,
            #[serde(flatten)]
            event: &'a Event,
            prev: &'a str,
        }
        let r = self.0;
        Body {
            schema: &r.schema,
            seq: r.seq,
            id: &r.id,
            ts: &r.ts,
            category: r.category,
            session: &r.session,
            user: &r.user,
            host: &r.host,
            event: &r.event,
            prev: &r.prev,
        }
        .serialize(s)
    }
}

/// The hash a line claims and the hash its content has. None when the line
/// has no hash field at the end.
/// One record as shipped elsewhere (a control plane): parsed, of a schema
/// this build knows, its content matching its own hash. Its place in the
/// chain is for the receiver to check against what it holds.
pub fn check_line(line: &str) -> Result<Record, String> {
    let r: Record = serde_json::from_str(line).map_err(|e| format!("not an audit record: {e}"))?;
    if r.schema != SCHEMA {
        return Err(format!("schema `{}` is not {SCHEMA}", r.schema));
    }
    match line_hashes(line) {
        Some((claimed, actual)) if claimed == actual && claimed == r.hash => Ok(r),
        _ => Err(format!(
            "record {} ({}) was edited: its content does not match its hash",
            r.seq, r.id
        )),
    }
}

pub(crate) fn line_hashes(line: &str) -> Option<(&str, String)> {
    let at = line.rfind(HASH_KEY)?;
    let claimed = line[at + HASH_KEY.len()..].strip_suffix("\"}")?;
    let mut body = String::with_capacity(at + 1);
    body.push_str(&line[..at]);
    body.push('}');
    Some((claimed, hex(&Sha256::digest(body.as_bytes()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_lines_verify_and_edits_do_not() {
        let mut r = Record {
            schema: SCHEMA.into(),
            seq: 1,
            id: "s-1".into(),
            ts: "2026-01-01T00:00:00.000000Z".into(),
            category: Category::Decision,
            session: "s".into(),
            user: "u".into(),
            host: "h".into(),
            event: Event {
                action: "connect".into(),
                resource: "a.com:443".into(),
                details: serde_json::json!({"k": "v"}),
                ..Event::default()
            },
            prev: GENESIS.into(),
            hash: String::new(),
        };
        let line = r.seal();
        let (claimed, actual) = line_hashes(&line).unwrap();
        assert_eq!(claimed, actual);
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let edited = line.replace("a.com", "b.com");
        let (claimed, actual) = line_hashes(&edited).unwrap();
        assert_ne!(claimed, actual);
    }
}
