//! The audit log writer. Every record is written (one `write(2)` of one
//! line, O_APPEND) before the caller acts on the decision it records, and
//! is on disk within the sync interval. A write or sync that fails poisons
//! the log: every later call fails, so the session fails closed instead of
//! acting without a record.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sbx_policy::{Decision, Surface};

use crate::record::{Category, Event, Record, GENESIS, SCHEMA};
use crate::{AuditError, Entry};

/// Who is acting, stamped on every record.
#[derive(Clone, Debug)]
pub struct Identity {
    pub session: String,
    pub user: String,
    pub host: String,
}

impl Identity {
    /// The current user and host, for `session`.
    pub fn current(session: &str) -> Identity {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| format!("uid:{uid}"));
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Identity {
            session: session.to_string(),
            user,
            host,
        }
    }
}

struct State {
    file: File,
    /// The file's length after the last whole record.
    len: u64,
    seq: u64,
    prev: String,
    dirty: bool,
    last_sync: Instant,
    /// Set once a write or sync fails; the log refuses everything after.
    failed: Option<String>,
    closed: bool,
}

impl State {
    /// Syncs what was written; a failure poisons the log.
    fn sync(&mut self) -> Result<(), String> {
        if !self.dirty {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            let why = format!("fsync failed: {e}");
            self.failed = Some(why.clone());
            return Err(why);
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

struct Shared {
    path: PathBuf,
    identity: Identity,
    interval: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

/// An open, append-only, hash-chained audit log for one session.
pub struct AuditLog {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// Where a record landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub id: String,
}

/// The record after `prev` (`(0, GENESIS)` for the first) in a chain kept
/// somewhere other than a log file (the control plane keeps its admin log
/// in its database), and its line: the same format, so `sbx audit verify`
/// checks an export of it.
pub fn chained(
    prev: (u64, &str),
    identity: &Identity,
    category: Category,
    event: Event,
) -> (Record, String) {
    chained_at(prev, identity, category, event, now_rfc3339())
}

/// The same, stamped `ts` (RFC 3339) rather than now: for records made up
/// elsewhere (benchmarks, imports).
pub fn chained_at(
    prev: (u64, &str),
    identity: &Identity,
    category: Category,
    event: Event,
    ts: String,
) -> (Record, String) {
    let seq = prev.0 + 1;
    let mut record = Record {
        schema: SCHEMA.to_string(),
        seq,
        id: format!("{}-{seq}", identity.session),
        ts,
        category,
        session: identity.session.clone(),
        user: identity.user.clone(),
        host: identity.host.clone(),
        event,
        prev: prev.1.to_string(),
        hash: String::new(),
    };
    let line = record.seal();
    (record, line)
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// The sequence number and hash of the last record of an existing log, so
/// that a reopened log continues its chain.
fn tail(file: &File, path: &Path) -> Result<(u64, String), AuditError> {
    let mut last = None;
    let mut reader = BufReader::new(file);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| AuditError::io(path, "read", e))?;
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| AuditError::io(path, "read", e))?;
        if !line.trim().is_empty() {
            last = Some((n + 1, line));
        }
    }
    let Some((n, line)) = last else {
        return Ok((0, GENESIS.to_string()));
    };
    let r: Record = serde_json::from_str(&line).map_err(|e| AuditError::Corrupt {
        path: path.to_path_buf(),
        line: n,
        what: format!(
            "the last record is not valid ({e}); run `sbx audit verify` and move the log aside"
        ),
    })?;
    Ok((r.seq, r.hash))
}

impl AuditLog {
    /// Opens (or creates) the log at `path` for appending. `interval` bounds
    /// how long a record may sit in the page cache before it is synced.
    pub fn open(
        path: &Path,
        identity: Identity,
        interval: Duration,
    ) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| AuditError::io(dir, "create the directory of", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| AuditError::io(path, "open", e))?;
        // One writer per log: two would fork the chain.
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(AuditError::Busy(path.to_path_buf()));
        }
        let (seq, prev) = tail(&file, path)?;
        let len = file
            .metadata()
            .map_err(|e| AuditError::io(path, "read the length of", e))?
            .len();
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            identity,
            interval,
            state: Mutex::new(State {
                file,
                len,
                seq,
                prev,
                dirty: false,
                last_sync: Instant::now(),
                failed: None,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let flusher = with_signals_blocked(|| {
            sbx_seccomp::spawn("audit-sync", sbx_seccomp::Kind::Audit, move || {
                flush_loop(&s)
            })
        })
        .map_err(|e| AuditError::io(path, "start the sync thread for", e))?;
        Ok(AuditLog {
            shared,
            flusher: Some(flusher),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one record. Returns only once the line is written; an error
    /// means the caller must not go ahead.
    pub fn append(&self, category: Category, event: Event) -> Result<Appended, AuditError> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(AuditError::Failed {
                path: self.shared.path.clone(),
                why: why.clone(),
            });
        }
        if st.closed {
            return Err(AuditError::Failed {
                path: self.shared.path.clone(),
                why: "the log is closed".into(),
            });
        }
        let (record, mut line) =
            chained((st.seq, &st.prev), &self.shared.identity, category, event);
        line.push('\n');
        if let Err(e) = st.file.write_all(line.as_bytes()) {
            // A full disk can take part of the line: cut it off, so that
            // the log still ends with a whole record and verifies.
            let _ = st.file.set_len(st.len);
            return Err(self.poison(&mut st, format!("write failed: {e}")));
        }
        st.len += line.len() as u64;
        st.seq = record.seq;
        st.prev = record.hash;
        if st.last_sync.elapsed() >= self.shared.interval {
            st.dirty = true;
            self.sync_locked(&mut st)?;
        } else if !std::mem::replace(&mut st.dirty, true) {
            // The flusher sleeps while nothing is dirty: it syncs this
            // record within the interval.
            self.shared.wake.notify_all();
        }
        Ok(Appended {
            seq: record.seq,
            id: record.id,
        })
    }

    /// Appends one record of a kind [`Entry`] builds.
    pub fn record(&self, entry: Entry) -> Result<Appended, AuditError> {
        self.append(entry.category, entry.event)
    }

    /// Records a policy decision and says whether the action may go ahead.
    pub fn decision(
        &self,
        surface: Surface,
        action: &str,
        resource: &str,
        d: &Decision<'_>,
    ) -> Result<bool, AuditError> {
        self.record(Entry::decision(surface, action, resource, d))?;
        Ok(d.allowed())
    }

    fn poison(&self, st: &mut State, why: String) -> AuditError {
        st.failed = Some(why.clone());
        AuditError::Failed {
            path: self.shared.path.clone(),
            why,
        }
    }

    fn sync_locked(&self, st: &mut State) -> Result<(), AuditError> {
        st.sync().map_err(|why| AuditError::Failed {
            path: self.shared.path.clone(),
            why,
        })
    }

    /// Forces everything written so far to disk.
    pub fn sync(&self) -> Result<(), AuditError> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(AuditError::Failed {
                path: self.shared.path.clone(),
                why: why.clone(),
            });
        }
        self.sync_locked(&mut st)
    }

    /// Syncs and closes the log.
    pub fn close(mut self) -> Result<(), AuditError> {
        let r = self.sync();
        self.stop();
        r
    }

    fn stop(&mut self) {
        self.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let _ = self.sync();
        self.stop();
    }
}

/// Runs `f` (which spawns a thread) with every signal blocked, so the new
/// thread starts with them blocked: a process-directed SIGTERM must reach the
/// thread that handles it (the VMM's event loop), not kill the process
/// through a helper thread that never asked for it.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data, filled by sigfillset; pthread_sigmask
    // changes only this thread's mask and is restored below.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

fn flush_loop(shared: &Shared) {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if st.closed {
            return;
        }
        // Nothing to sync: sleep until a record is written, so that an
        // idle session's flusher does not wake the host for nothing.
        if !st.dirty || st.failed.is_some() {
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let due = shared.interval.saturating_sub(st.last_sync.elapsed());
        if due.is_zero() {
            // A failure poisons the log; the next append reports it.
            let _ = st.sync();
            continue;
        }
        st = shared
            .wake
            .wait_timeout(st, due)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// The audit event for a policy decision.
pub fn decision_event(surface: Surface, action: &str, resource: &str, d: &Decision<'_>) -> Event {
    Event {
        surface: Some(surface.as_str().to_string()),
        action: action.to_string(),
        resource: resource.to_string(),
        decision: Some(d.outcome().to_string()),
        rule_id: Some(d.rule.id.clone()),
        layer: Some(d.rule.layer.as_str().to_string()),
        rule_source: Some(d.rule.location.to_string()),
        reason: Some(d.reason.to_string()),
        mode: Some(d.mode().as_str().to_string()),
        details: serde_json::Value::Null,
    }
}

impl AuditError {
    pub(crate) fn io(path: &Path, what: &str, e: io::Error) -> AuditError {
        AuditError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    /// The flusher sleeps while nothing is dirty; a record written soon
    /// after a sync wakes it, and it syncs that record within the interval.
    #[test]
    fn the_sleeping_flusher_syncs_a_record_within_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let interval = Duration::from_millis(200);
        let log = AuditLog::open(
            &dir.path().join("a.jsonl"),
            Identity::current("s"),
            interval,
        )
        .unwrap();
        for _ in 0..3 {
            log.sync().unwrap();
            log.record(Entry::session_stop("s", serde_json::Value::Null))
                .unwrap();
            assert!(log.lock().dirty, "synced at once, inside the interval");
            let deadline = Instant::now() + 10 * interval;
            while log.lock().dirty {
                assert!(Instant::now() < deadline, "the record was never synced");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
