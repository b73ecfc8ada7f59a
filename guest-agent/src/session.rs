//! Session mode: the agent serves the host over vsock instead of running
//! one command. Each connection to `AGENT_PORT` carries one request: run a
//! process (streams, PTY, signals, exit status), say hello, shut down, or
//! revalidate shared paths the host changed.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_protocol::agent::{
    write_data, write_frame, Control, EventKind, ExecRequest, Frame, FrameIo, Stream, AGENT_PORT,
    INITIAL_CREDIT, VERSION,
};

use crate::{events, exec, reaper, vsock};

pub fn serve() -> ! {
    if let Err(e) = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reaper::run)
    {
        eprintln!("sbx-guest-agent: cannot start the reaper: {e}");
    }
    let listener = match vsock::Listener::bind(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sbx-guest-agent: cannot listen on vsock port {AGENT_PORT}: {e}");
            crate::init::reboot();
        }
    };
    if !events::connect() {
        eprintln!("sbx-guest-agent: the host's event port did not answer; events are lost");
    }
    events::send(EventKind::AgentReady, None, &[], None);
    loop {
        match listener.accept() {
            Ok(conn) => {
                let _ = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || handle(conn));
            }
            Err(e) => {
                eprintln!("sbx-guest-agent: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, frame: &Frame) -> bool {
    write_frame(&mut *w.lock().unwrap_or_else(|e| e.into_inner()), frame).is_ok()
}

fn control(w: &Writer, c: Control) -> bool {
    send(w, &Frame::Control(c))
}

fn handle(conn: UnixStream) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let writer: Writer = Arc::new(Mutex::new(conn));
    let mut frames = FrameIo::new(read_half);
    match frames.read_frame() {
        Ok(Some(Frame::Control(Control::Exec(req)))) => run(&writer, frames, req),
        Ok(Some(Frame::Control(Control::Hello { .. }))) => {
            control(
                &writer,
                Control::Hello {
                    version: VERSION,
                    agent: format!("sbx-guest-agent {}", env!("CARGO_PKG_VERSION")),
                },
            );
        }
        Ok(Some(Frame::Control(Control::Shutdown))) => shutdown(),
        Ok(Some(Frame::Control(Control::Refresh { paths, trees }))) => {
            crate::refresh::run(&paths, &trees)
        }
        Ok(Some(_)) => {
            control(
                &writer,
                Control::Error {
                    id: None,
                    message: "expected exec, hello, shutdown or refresh".into(),
                },
            );
        }
        Ok(None) | Err(_) => {}
    }
}

/// The most output read and sent at once.
const PUMP_READ: usize = 1 << 20;

/// Copies one output stream into data frames until EOF.
fn pump(mut from: std::fs::File, w: Writer, id: u32, stream: Stream) {
    // Output the host has not taken yet gathers in a larger pipe, and goes
    // out in one write of many frames: fewer wakeups on both sides of the
    // VM boundary, where each costs an exit. (A PTY has no pipe size.)
    // SAFETY: F_SETPIPE_SZ on a descriptor this function owns.
    unsafe {
        libc::fcntl(
            from.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PUMP_READ as libc::c_int,
        )
    };
    let mut buf = vec![0u8; PUMP_READ];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut out = w.lock().unwrap_or_else(|e| e.into_inner());
                if write_data(&mut *out, id, stream, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the PTY's last slave closed.
            Err(_) => return,
        }
    }
}

/// Writes host input to the process and returns credit as it is taken, so
/// that input the process does not read stays on the host.
fn feed(
    mut to: Option<std::fs::File>,
    input: Receiver<Option<Vec<u8>>>,
    outstanding: Arc<AtomicU64>,
    w: Writer,
    id: u32,
) {
    for msg in input {
        match msg {
            Some(bytes) => {
                outstanding.fetch_sub(bytes.len() as u64, Ordering::SeqCst);
                if let Some(f) = to.as_mut() {
                    if f.write_all(&bytes).is_err() {
                        // The process closed its input: drop the rest, keep granting.
                        to = None;
                    }
                }
                let credit = Control::Credit {
                    id,
                    stream: Stream::Stdin,
                    bytes: bytes.len() as u32,
                };
                if !control(&w, credit) {
                    return;
                }
            }
            None => to = None,
        }
    }
}

fn signal_group(pid: libc::pid_t, signal: i32) {
    // SAFETY: kill(2) on the process group the agent created.
    unsafe { libc::kill(-pid, signal) };
}

fn run(w: &Writer, mut frames: FrameIo<UnixStream>, req: ExecRequest) {
    let id = req.id;
    let p = match exec::spawn(&req) {
        Ok(p) => p,
        Err(e) => {
            control(
                w,
                Control::Error {
                    id: Some(id),
                    message: e.message,
                },
            );
            control(
                w,
                Control::Exited {
                    id,
                    code: Some(e.code),
                    signal: None,
                },
            );
            return;
        }
    };
    let pid = p.pid;
    control(
        w,
        Control::Started {
            id,
            pid: pid as u32,
        },
    );
    events::send(EventKind::ProcessStarted, Some(id), &req.argv, None);

    let mut pumps = Vec::new();
    for (file, stream) in [(p.stdout, Stream::Stdout), (p.stderr, Stream::Stderr)] {
        if let Some(f) = file {
            let w = w.clone();
            pumps.push(std::thread::spawn(move || pump(f, w, id, stream)));
        }
    }
    let (input_tx, input_rx) = channel();
    // Input bytes received but not yet written to the process.
    let outstanding = Arc::new(AtomicU64::new(0));
    {
        let (stdin, w, outstanding) = (p.stdin, w.clone(), outstanding.clone());
        std::thread::spawn(move || feed(stdin, input_rx, outstanding, w, id));
    }
    let done = Arc::new(AtomicBool::new(false));
    let pty = p.pty;
    {
        let done = done.clone();
        std::thread::spawn(move || {
            loop {
                match frames.read_frame() {
                    Ok(Some(Frame::Data {
                        stream: Stream::Stdin,
                        bytes,
                        ..
                    })) => {
                        // Input beyond the credit granted means a broken host.
                        let held = outstanding.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                        if held + bytes.len() as u64 > u64::from(INITIAL_CREDIT) {
                            break;
                        }
                        if input_tx.send(Some(bytes)).is_err() {
                            break;
                        }
                    }
                    Ok(Some(Frame::Control(Control::Credit { .. }))) => {}
                    Ok(Some(Frame::Control(Control::CloseStdin { .. }))) => {
                        let _ = input_tx.send(None);
                    }
                    Ok(Some(Frame::Control(Control::Resize { size, .. }))) => {
                        if let Some(m) = &pty {
                            exec::set_winsize(m, size);
                        }
                    }
                    Ok(Some(Frame::Control(Control::Kill { signal, .. }))) => {
                        signal_group(pid, signal);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            // The host went away while the process runs: hang it up, as a
            // terminal would.
            if !done.load(Ordering::SeqCst) {
                signal_group(pid, libc::SIGHUP);
                signal_group(pid, libc::SIGCONT);
            }
        });
    }

    let status = p.status.recv().unwrap_or(0);
    for t in pumps {
        let _ = t.join();
    }
    done.store(true, Ordering::SeqCst);
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (Some(1), None)
    };
    control(w, Control::Exited { id, code, signal });
    events::send(
        EventKind::ProcessExited,
        Some(id),
        &req.argv,
        code.or(signal.map(|s| 128 + s)),
    );
    let _ = w
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(std::net::Shutdown::Both);
}

/// Ends every process (TERM, then KILL after a grace period), syncs and
/// powers off, which ends the VM.
fn shutdown() -> ! {
    // SAFETY: kill(-1) signals every process but init.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    // SAFETY: kill(-1, 0) probes whether any process is left.
    while Instant::now() < deadline && unsafe { libc::kill(-1, 0) } == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    crate::init::reboot();
}
