//! `sbx audit verify`: walks the chain and names the first record that was
//! edited, deleted or moved.

use std::collections::HashMap;
use std::path::Path;

use crate::record::{line_hashes, Record, GENESIS, SCHEMA};
use crate::AuditError;

/// A log whose chain is intact.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The hash of the last record: keep it elsewhere to detect a log that
    /// was rewritten or truncated as a whole.
    pub head: String,
}

/// The first place the chain breaks.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub seq: Option<u64>,
    pub id: Option<String>,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let (Some(seq), Some(id)) = (self.seq, &self.id) {
            write!(f, " (record {seq}, id {id})")?;
        }
        write!(f, ": {}", self.what)
    }
}

pub fn verify(path: &Path) -> Result<Result<Verified, Problem>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditError::io(path, "read", e))?;
    Ok(verify_lines(&text))
}

/// The same, for a log's text held elsewhere (the control plane's admin
/// log).
pub fn verify_lines(text: &str) -> Result<Verified, Problem> {
    let problem = |line: usize, r: Option<&Record>, what: String| Problem {
        line,
        seq: r.map(|r| r.seq),
        id: r.map(|r| r.id.clone()),
        what,
    };
    let mut records = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = i + 1;
        let r: Record = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return Err(problem(n, None, format!("not an audit record: {e}"))),
        };
        if r.schema != SCHEMA {
            let what = format!("schema `{}` is not {SCHEMA}", r.schema);
            return Err(problem(n, Some(&r), what));
        }
        match line_hashes(line) {
            Some((claimed, actual)) if claimed == actual && claimed == r.hash => {}
            _ => {
                let what = "edited: its content does not match its hash".to_string();
                return Err(problem(n, Some(&r), what));
            }
        }
        records.push((n, r));
    }
    let lines_by_seq: HashMap<u64, usize> = records.iter().map(|(n, r)| (r.seq, *n)).collect();
    let (mut seq, mut prev) = (0u64, GENESIS.to_string());
    for (n, r) in &records {
        let expected = seq + 1;
        if r.seq != expected {
            let what = match lines_by_seq.get(&expected) {
                Some(at) => {
                    format!("out of order: record {expected} should come here but is on line {at}")
                }
                None if r.seq > expected => {
                    let last = r.seq - 1;
                    if last == expected {
                        format!("record {expected} is missing before this line (deleted)")
                    } else {
                        format!(
                            "records {expected} to {last} are missing before this line (deleted)"
                        )
                    }
                }
                None => format!("out of order: record {} follows record {seq}", r.seq),
            };
            return Err(problem(*n, Some(r), what));
        }
        if r.prev != prev {
            let what =
                "its link to the record before it is broken: a record before it was replaced"
                    .to_string();
            return Err(problem(*n, Some(r), what));
        }
        seq = r.seq;
        prev = r.hash.clone();
    }
    Ok(Verified {
        records: seq,
        head: prev,
    })
}
