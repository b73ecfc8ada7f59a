//! What the guest says: the agent's events (on host vsock port
//! [`EVENTS_PORT`](sbx_protocol::agent::EVENTS_PORT)) and its console,
//! where kernel panics and oopses are looked for, since the guest cannot
//! be trusted to report its own crashes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use sbx_audit::{AuditLog, Entry, GuestReport};
use sbx_protocol::agent::{Control, EventKind, Frame, FrameIo, GuestEvent};
use serde_json::{json, Value};

fn record(log: &AuditLog, report: GuestReport, resource: &str, details: Value) {
    if let Err(e) = log.record(Entry::guest(report, resource, details)) {
        tracing::error!("{e}");
    }
}

/// Records what the guest agent reports until the VM ends; calls
/// `on_ready` at every `agent_ready`.
pub fn serve_events(
    conns: Receiver<UnixStream>,
    log: &AuditLog,
    session: &str,
    on_ready: &dyn Fn(),
) {
    // The agent opens one events connection; a new one replaces it.
    for conn in conns {
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
            let details = json!({ "id": id, "argv": argv, "code": code });
            match kind {
                EventKind::AgentReady => {
                    record(log, GuestReport::AgentReady, session, details);
                    on_ready();
                }
                EventKind::ProcessStarted => {
                    record(log, GuestReport::ProcessStarted, &argv.join(" "), details)
                }
                EventKind::ProcessExited => {
                    record(log, GuestReport::ProcessExited, &argv.join(" "), details)
                }
                // Those come from the console (`ConsoleWatch`).
                EventKind::KernelPanic | EventKind::KernelOops => {}
            }
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

/// The guest console goes to `console.log`; kernel panics and oopses seen
/// there become guest records.
pub struct ConsoleWatch {
    pub file: std::fs::File,
    pub line: Vec<u8>,
    pub log: Arc<AuditLog>,
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write_all(buf)?;
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                if let Some(report) = classify(&line) {
                    record(&self.log, report, "console", json!({ "line": line.trim() }));
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
