//! The session's control socket (`ctl.sock`): one connection per request.
//! An exec is checked against the policy and audited here, given the
//! session's environment, and then the client's socket is handed to the
//! vsock device, which moves its bytes to the guest agent directly.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use sbx_audit::{AuditLog, Entry};
use sbx_policy::{Policy, Surface};
use sbx_protocol::agent::{encode, write_frame, Control, Frame, FrameIo, AGENT_PORT, VERSION};
use vmm::devices::virtio::vsock::VsockHost;

use crate::error::{At, Result};
use crate::state::Phase;
use crate::EXIT_SBX_ERROR;

/// What every exec gets unless the request says otherwise.
pub struct ExecDefaults {
    /// Environment before the request's own.
    pub env: Vec<(String, String)>,
    /// The user commands run as when the request names none (an agent
    /// template's non-root user); None: root.
    pub user: Option<String>,
}

/// Pauses and resumes the session's VM, keeping its recorded phase true.
pub struct PauseControl {
    pub switch: Arc<vmm::PauseSwitch>,
    pub status: crate::session::Status,
}

/// How long a pause waits for the vCPUs to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request is served with.
struct Served {
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    host: VsockHost,
    defaults: ExecDefaults,
    pause: PauseControl,
}

/// Serves `listener` on a thread of its own, a thread per connection.
pub fn serve(
    listener: UnixListener,
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    host: VsockHost,
    defaults: ExecDefaults,
    pause: PauseControl,
) -> Result<()> {
    let served = Arc::new(Served {
        policy,
        log,
        host,
        defaults,
        pause,
    });
    // Each request's thread is started from it, under its filter.
    sbx_seccomp::spawn("control", sbx_seccomp::Kind::Control, move || {
        for conn in listener.incoming().flatten() {
            let served = served.clone();
            let _ = std::thread::Builder::new()
                .name("request".into())
                .spawn(move || request(conn, &served));
        }
    })
    .at(|| "cannot start the control thread".into())?;
    Ok(())
}

fn reply(stream: &mut UnixStream, c: Control) {
    let _ = write_frame(stream, &Frame::Control(c));
}

/// Answers exec `id` with `message` and sbx's own failure status.
fn refuse(stream: &mut UnixStream, id: u32, message: String) {
    reply(
        stream,
        Control::Error {
            id: Some(id),
            message,
        },
    );
    reply(
        stream,
        Control::Exited {
            id,
            code: Some(i32::from(EXIT_SBX_ERROR)),
            signal: None,
        },
    );
}

/// Serves one control connection: an exec (checked, audited, given the
/// session's environment, then handed to the guest agent), a shutdown, or
/// a hello.
fn request(mut conn: UnixStream, s: &Served) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut frames = FrameIo::new(read_half);
    match frames.read_frame() {
        Ok(Some(Frame::Control(Control::Exec(req)))) if s.pause.switch.is_paused() => {
            let message = format!(
                "session `{}` is paused; `sbx resume {0}` first",
                s.pause.status.name()
            );
            refuse(&mut conn, req.id, message);
        }
        Ok(Some(Frame::Control(Control::Exec(mut req)))) => {
            // The caller's own -e settings come after, and win.
            req.env.splice(0..0, s.defaults.env.iter().cloned());
            if req.user.is_none() {
                req.user.clone_from(&s.defaults.user);
            }
            let argv0 = req.argv.first().cloned().unwrap_or_default();
            let d = s.policy.decide_exec(&argv0);
            let refusal = match s
                .log
                .decision(Surface::Exec, "exec", &req.argv.join(" "), &d)
            {
                Ok(true) => None,
                Ok(false) => Some(sbx_audit::denial("exec", &argv0, &d)),
                Err(e) => Some(format!("{e}")),
            };
            if let Some(message) = refusal {
                refuse(&mut conn, req.id, message);
                return;
            }
            let (stream, rest) = frames.into_parts();
            let mut prefix = Vec::new();
            encode(&Frame::Control(Control::Exec(req)), &mut prefix);
            prefix.extend(rest);
            s.host.attach(AGENT_PORT, stream, prefix);
        }
        Ok(Some(Frame::Control(c @ (Control::Pause | Control::Resume)))) => {
            let answer = pause_or_resume(s, c == Control::Pause);
            reply(&mut conn, answer);
        }
        Ok(Some(Frame::Control(Control::Shutdown))) => {
            // A paused guest cannot shut itself down.
            if s.pause.switch.is_paused() {
                let _ = pause_or_resume(s, false);
            }
            match s.host.connect(AGENT_PORT, Duration::from_secs(5)) {
                Ok(mut agent) => {
                    let _ = write_frame(&mut agent, &Frame::Control(Control::Shutdown));
                    reply(&mut conn, Control::Shutdown);
                }
                Err(e) => reply(
                    &mut conn,
                    Control::Error {
                        id: None,
                        message: e.to_string(),
                    },
                ),
            }
        }
        Ok(Some(Frame::Control(Control::Hello { .. }))) => reply(
            &mut conn,
            Control::Hello {
                version: VERSION,
                agent: format!("sbx {}", env!("CARGO_PKG_VERSION")),
            },
        ),
        Ok(Some(_)) => reply(
            &mut conn,
            Control::Error {
                id: None,
                message: "expected exec, shutdown, pause, resume or hello".into(),
            },
        ),
        Ok(None) | Err(_) => {}
    }
}

/// Pauses (or resumes) the VM, records it and says how it went.
fn pause_or_resume(s: &Served, pause: bool) -> Control {
    let started = std::time::Instant::now();
    let result = if pause {
        s.pause.switch.pause(PAUSE_TIMEOUT)
    } else {
        s.pause.switch.resume();
        Ok(())
    };
    if let Err(e) = result {
        return Control::Error {
            id: None,
            message: format!("cannot pause the session: {e}"),
        };
    }
    let phase = if pause { Phase::Paused } else { Phase::Running };
    s.pause.status.set(phase, None);
    let took_ms = started.elapsed().as_secs_f64() * 1000.0;
    let entry = Entry::paused(pause, serde_json::json!({ "took_ms": took_ms }));
    if let Err(e) = s.log.record(entry) {
        tracing::warn!("{e}");
    }
    if pause {
        Control::Paused
    } else {
        Control::Resumed
    }
}
