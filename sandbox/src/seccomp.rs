//! The session process's seccomp filters (see `sbx_seccomp`): on unless
//! the spec turns them off by name (`unsafe_no_seccomp`). A call outside a
//! thread's filter is recorded in the audit log, naming the thread and the
//! call, and ends the session, whose state then says why.

use std::sync::{Arc, OnceLock};

use sbx_audit::{AuditLog, Entry};
use sbx_seccomp::{Mode, Violation};

use crate::error::{Error, Result};
use crate::session::Status;
use crate::spec::SessionSpec;
use crate::state::Phase;

/// Set by developers to find what a new code path calls: a call outside a
/// filter is allowed and logged by the kernel (`audit: type=1326`, with the
/// thread's name and the call's number) instead of ending the session.
pub const LOG_ENV: &str = "SBX_SECCOMP_LOG";

/// Where violations are recorded, once the log is open.
static LOG: OnceLock<Arc<AuditLog>> = OnceLock::new();

/// Turns the filters on for this process, before any of its threads
/// starts, unless the spec turns them off.
pub fn enable(spec: &SessionSpec, status: &Status) -> Result<()> {
    if spec.unsafe_no_seccomp {
        tracing::warn!("seccomp filters are OFF for this session (--unsafe-no-seccomp)");
        return Ok(());
    }
    let mode = if std::env::var_os(LOG_ENV).is_some() {
        Mode::Log
    } else {
        Mode::Enforce
    };
    let status = status.clone();
    sbx_seccomp::enable(mode, move |v: &Violation| {
        if let Some(log) = LOG.get() {
            let details = serde_json::json!({
                "thread": v.thread,
                "kind": v.kind,
                "number": v.number,
                "reason": v.to_string(),
            });
            let _ = log.record(Entry::seccomp_violation(&v.syscall, details));
            let _ = log.sync();
        }
        status.set(Phase::Stopped, Some(v.to_string()));
    })
    .map_err(|e| Error::Session(format!("{e}; --unsafe-no-seccomp runs without filters")))
}

/// Gives the violation reporter the session's audit log, and records how
/// the session's threads are filtered.
pub fn record_to(log: &Arc<AuditLog>) -> Result<()> {
    let _ = LOG.set(log.clone());
    let kinds = serde_json::json!({ "kinds": sbx_seccomp::Kind::ALL.map(sbx_seccomp::Kind::name) });
    let entry = match sbx_seccomp::mode() {
        None => Entry::seccomp("off", serde_json::json!({ "flag": "--unsafe-no-seccomp" })),
        Some(Mode::Enforce) => Entry::seccomp("enforce", kinds),
        Some(Mode::Log) => Entry::seccomp("log", kinds),
    };
    log.record(entry)?;
    Ok(())
}
