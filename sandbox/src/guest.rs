//! What the guest says: the agent's events (on host vsock port
//! [`EVENTS_PORT`](sbx_protocol::agent::EVENTS_PORT)) and its console,
//! where kernel panics and oopses are looked for, since the guest cannot
//! be trusted to report its own crashes.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use sbx_audit::{AuditLog, Entry, GuestReport};
use sbx_protocol::agent::{Control, EventKind, Frame, FrameIo, GuestEvent};
use serde_json::{json, Value};

use crate::throttle::Limits;

fn record(log: &AuditLog, report: GuestReport, resource: &str, details: Value) {
    if let Err(e) = log.record(Entry::guest(report, resource, details)) {
        tracing::error!("{e}");
    }
}

/// Records what the guest agent reports until the VM ends; calls
/// `on_ready` at every `agent_ready`. One connection is read at a time: a
/// new one (the agent reconnecting, or root in the guest taking over)
/// replaces the last, whose descriptor is closed at once, so connecting
/// again and again holds nothing on the host. Records stay within `limits`.
pub fn serve_events(
    conns: Receiver<UnixStream>,
    log: Arc<AuditLog>,
    session: String,
    limits: Arc<Limits>,
    on_ready: Arc<dyn Fn() + Send + Sync>,
) {
    let mut current: Option<UnixStream> = None;
    for conn in conns {
        if let Some(old) = current.take() {
            // Its reader sees the end and closes its half too.
            let _ = old.shutdown(Shutdown::Both);
        }
        current = conn.try_clone().ok();
        let (log, session, limits, on_ready) = (
            log.clone(),
            session.clone(),
            limits.clone(),
            on_ready.clone(),
        );
        let read = move || read_events(conn, &log, &session, &limits, &*on_ready);
        if std::thread::Builder::new()
            .name("events".into())
            .spawn(read)
            .is_err()
        {
            tracing::warn!("cannot start a thread for the guest's events");
        }
    }
}

fn read_events(
    conn: UnixStream,
    log: &AuditLog,
    session: &str,
    limits: &Limits,
    on_ready: &(dyn Fn() + Send + Sync),
) {
    let mut frames = FrameIo::new(conn);
    while let Ok(Some(frame)) = frames.read_frame() {
        let Frame::Control(Control::Event(GuestEvent {
            kind,
            id,
            argv,
            code,
            ..
        })) = frame
        else {
            continue;
        };
        let report = match kind {
            EventKind::AgentReady => GuestReport::AgentReady,
            EventKind::ProcessStarted => GuestReport::ProcessStarted,
            EventKind::ProcessExited => GuestReport::ProcessExited,
            // Those come from the console (`ConsoleWatch`).
            EventKind::KernelPanic | EventKind::KernelOops => continue,
        };
        if limits.guest_events.admit() {
            let resource = match report {
                GuestReport::AgentReady => session.to_string(),
                _ => argv.join(" "),
            };
            let details = json!({ "id": id, "argv": argv, "code": code });
            record(log, report, &resource, details);
        }
        // Recorded first, so that whoever hears of it finds it in the log.
        if report == GuestReport::AgentReady {
            on_ready();
        }
    }
}

/// Console line prefixes (after the kernel's timestamp) that mean trouble.
const PANIC_MARKS: [&str; 1] = ["Kernel panic - not syncing"];
const OOPS_MARKS: [&str; 4] = ["Oops:", "BUG:", "general protection fault", "WARNING: CPU:"];

pub fn classify(line: &str) -> Option<GuestReport> {
    if PANIC_MARKS.iter().any(|m| line.contains(m)) {
        Some(GuestReport::KernelPanic)
    } else if OOPS_MARKS.iter().any(|m| line.contains(m)) {
        Some(GuestReport::KernelOops)
    } else {
        None
    }
}

/// How much of the guest's console `console.log` keeps: the boot and
/// whatever came after, up to this; past it, output is dropped (and said
/// so, once) while panics are still looked for.
pub const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// The guest console goes to `console.log`, up to [`CONSOLE_LOG_MAX`];
/// kernel panics and oopses seen there become guest records, within the
/// session's console limit.
pub struct ConsoleWatch {
    file: std::fs::File,
    written: u64,
    line: Vec<u8>,
    log: Arc<AuditLog>,
    limits: Arc<Limits>,
}

impl ConsoleWatch {
    pub fn new(file: std::fs::File, log: Arc<AuditLog>, limits: Arc<Limits>) -> ConsoleWatch {
        ConsoleWatch {
            file,
            written: 0,
            line: Vec::new(),
            log,
            limits,
        }
    }

    fn keep(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let room = CONSOLE_LOG_MAX.saturating_sub(self.written);
        if room == 0 {
            return Ok(());
        }
        let n = buf.len().min(room as usize);
        self.file.write_all(&buf[..n])?;
        self.written += n as u64;
        if self.written == CONSOLE_LOG_MAX {
            let note = format!("\n[sbx: the console log stops at {CONSOLE_LOG_MAX} bytes; later output is not kept]\n");
            self.file.write_all(note.as_bytes())?;
        }
        Ok(())
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.keep(buf)?;
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                if let Some(report) = classify(&line) {
                    if self.limits.console.admit() {
                        record(&self.log, report, "console", json!({ "line": line.trim() }));
                    }
                }
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbx_protocol::agent::encode;
    use std::io::Read;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Root in the guest connects to the events port again and again, then
    /// floods the last connection: the host holds one connection, and
    /// every report is either recorded or counted.
    #[test]
    fn the_events_port_holds_one_connection_and_floods_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let log = Arc::new(
            AuditLog::open(
                &path,
                sbx_audit::Identity::current("t"),
                std::time::Duration::from_secs(1),
            )
            .unwrap(),
        );
        let limits = Limits::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let readies = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let on_ready: Arc<dyn Fn() + Send + Sync> = {
            let r = readies.clone();
            Arc::new(move || {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let serving = {
            let (log, limits) = (log.clone(), limits.clone());
            std::thread::spawn(move || serve_events(rx, log, "t".into(), limits, on_ready))
        };
        let before = open_fds();
        let mut guest_ends = Vec::new();
        for _ in 0..300 {
            let (host_end, guest_end) = UnixStream::pair().unwrap();
            tx.send(host_end).unwrap();
            guest_ends.push(guest_end);
        }
        let mut last = guest_ends.pop().unwrap();
        // Every replaced connection was ended from the host side.
        for mut g in guest_ends.drain(..) {
            g.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            assert_eq!(g.read(&mut [0u8; 1]).unwrap(), 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        // What is left: the live connection's host end and the clone kept to
        // end it, and the test's own guest end of it; the count is the
        // process's, so tests running beside this one may hold a few more.
        // A leak would hold one per connection.
        let held = open_fds().saturating_sub(before);
        assert!(held <= 16, "{held} descriptors open for 300 connections");

        let flood = 5000;
        let mut bytes = Vec::new();
        for id in 0..flood {
            let event = GuestEvent {
                kind: if id == 0 {
                    EventKind::AgentReady
                } else {
                    EventKind::ProcessStarted
                },
                id: Some(id),
                argv: vec!["x\nforged".into()],
                code: None,
                detail: None,
            };
            encode(&Frame::Control(Control::Event(event)), &mut bytes);
        }
        last.write_all(&bytes).unwrap();
        drop(last);
        drop(tx);
        serving.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The reader thread is done once the log has every admitted record.
        let recorded = sbx_audit::read_records(&path, &mut sbx_audit::Cursor::default())
            .unwrap()
            .len() as u64;
        let dropped = limits.guest_events.take_dropped();
        // The burst of 1,000, and what refilled while the flood was read.
        assert!(recorded < 1100, "{recorded} records for a flood");
        assert_eq!(recorded + dropped, u64::from(flood));
        assert_eq!(readies.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn the_console_log_stops_at_its_cap_and_panics_are_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            AuditLog::open(
                &dir.path().join("t.jsonl"),
                sbx_audit::Identity::current("t"),
                std::time::Duration::from_secs(1),
            )
            .unwrap(),
        );
        let path = dir.path().join("console.log");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = ConsoleWatch::new(file, log.clone(), Limits::new());
        let line = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            w.write_all(&line).unwrap();
        }
        w.write_all(b"\n[ 9.9] Kernel panic - not syncing: late\n")
            .unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            (CONSOLE_LOG_MAX..CONSOLE_LOG_MAX + 200).contains(&size),
            "{size}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("later output is not kept]\n"));
        let records =
            sbx_audit::read_records(log.path(), &mut sbx_audit::Cursor::default()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event.action, "kernel_panic");
    }

    #[test]
    fn console_lines_are_classified() {
        assert_eq!(
            classify("[    1.2] Kernel panic - not syncing: Attempted to kill init!"),
            Some(GuestReport::KernelPanic)
        );
        assert_eq!(
            classify("[    3.0] BUG: kernel NULL pointer dereference, address: 0"),
            Some(GuestReport::KernelOops)
        );
        assert_eq!(
            classify("Oops: 0002 [#1] SMP"),
            Some(GuestReport::KernelOops)
        );
        assert_eq!(classify("hello from the guest"), None);
    }
}
