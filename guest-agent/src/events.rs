//! The agent's event stream to the host: one vsock connection to
//! `EVENTS_PORT`, opened at start. Events are best effort: the host records
//! what arrives, and a missing host never blocks a process.

use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sbx_protocol::agent::{
    write_frame, Control, EventKind, Frame, GuestEvent, EVENTS_PORT, VERSION,
};

fn stream() -> &'static Mutex<Option<UnixStream>> {
    static S: OnceLock<Mutex<Option<UnixStream>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(None))
}

/// Connects to the host (retrying briefly while its side comes up) and
/// says hello.
pub fn connect() -> bool {
    for _ in 0..50 {
        if let Ok(mut s) = crate::vsock::connect(crate::vsock::HOST_CID, EVENTS_PORT) {
            let hello = Frame::Control(Control::Hello {
                version: VERSION,
                agent: format!("sbx-guest-agent {}", env!("CARGO_PKG_VERSION")),
            });
            if write_frame(&mut s, &hello).is_ok() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                *stream().lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn send(kind: EventKind, id: Option<u32>, argv: &[String], code: Option<i32>) {
    let event = Frame::Control(Control::Event(GuestEvent {
        kind,
        id,
        argv: argv.to_vec(),
        code,
        detail: None,
    }));
    let mut guard = stream().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = guard.as_mut() {
        if write_frame(s, &event).is_err() {
            *guard = None;
        }
    }
}
