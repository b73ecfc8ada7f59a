//! Reading records back, filtered, for `sbx events`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::record::Record;
use crate::AuditError;

/// Which records to show. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub session: Option<String>,
    pub surface: Option<String>,
    pub decision: Option<String>,
    pub category: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        if !eq(&self.session, Some(&r.session))
            || !eq(&self.surface, r.event.surface.as_deref())
            || !eq(&self.decision, r.event.decision.as_deref())
            || !eq(&self.category, Some(r.category.as_str()))
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(ts) = OffsetDateTime::parse(&r.ts, &Rfc3339) else {
            return false;
        };
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }
}

/// An RFC 3339 time, or a duration ago such as `10m` or `2h`.
pub fn parse_time(s: &str, now: OffsetDateTime) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let ago = sbx_policy::parse_duration(s)?;
    now.checked_sub(time::Duration::try_from(ago).ok()?)
}

/// Where the next read of a log starts, so that `--follow` reads only what
/// was added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub offset: u64,
    /// Lines before `offset`, for error messages.
    pub line: usize,
}

/// The whole records of a log from `cursor` on, in file order; moves the
/// cursor past them. A partial last line is left for next time.
pub fn read_records(path: &Path, cursor: &mut Cursor) -> Result<Vec<Record>, AuditError> {
    let mut file = std::fs::File::open(path).map_err(|e| AuditError::io(path, "read", e))?;
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(cursor.offset))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| AuditError::io(path, "read", e))?;
    let mut out = Vec::new();
    for chunk in bytes.split_inclusive(|b| *b == b'\n') {
        if !chunk.ends_with(b"\n") {
            break;
        }
        cursor.offset += chunk.len() as u64;
        cursor.line += 1;
        let line = String::from_utf8_lossy(chunk);
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(&line).map_err(|e| AuditError::Corrupt {
            path: path.to_path_buf(),
            line: cursor.line,
            what: format!("not an audit record ({e}); `sbx audit verify` checks the whole log"),
        })?;
        out.push(r);
    }
    Ok(out)
}
