//! sbx's audit log: one JSON line per policy decision and guest event,
//! written before the decision takes effect, synced on a bounded interval,
//! hash-chained so that edits, deletions and reordering are detected.

mod entry;
mod log;
mod printable;
mod query;
mod record;
mod verify;

use std::path::PathBuf;

pub use entry::{denial, Entry, GuestReport, RuleCite};
pub use log::{chained, chained_at, decision_event, Appended, AuditLog, Identity};
pub use printable::printable;
pub use query::{parse_time, read_records, Cursor, Filter};
pub use record::{check_line, Category, Event, Record, GENESIS, SCHEMA};
pub use verify::{verify, verify_lines, Problem, Verified};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot {what} audit log {}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("audit log {} is in use by another sbx process; one session writes one log", .0.display())]
    Busy(PathBuf),
    /// The log can no longer record; the session must stop acting.
    #[error("audit log {} cannot record ({why}); failing closed: nothing more is allowed until it can", path.display())]
    Failed { path: PathBuf, why: String },
    #[error("audit log {}, line {line}: {what}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        what: String,
    },
}
