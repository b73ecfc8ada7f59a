//! Running a command in a session with this process's own standard input,
//! output and terminal (`sbx exec`, `sbx shell`, `sbx run`): one
//! connection to the session's control socket per command, carrying the
//! guest agent protocol.
//!
//! Standard input goes up within the credit the agent grants, so a command
//! that never reads its input holds back only this client. Output is
//! written straight to descriptors 1 and 2, unbuffered, so pipes see bytes
//! as they come. The exit status is the command's own.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use sbx_protocol::agent::{
    write_frame, Control, ExecRequest, Frame, FrameIo, Stream, WinSize, INITIAL_CREDIT, MAX_DATA,
};

use crate::error::{fail, At, Result};
use crate::state::Dir;
use crate::sys::block_signals;
use crate::terminal::RawMode;

/// A command to run, and how.
pub struct Request {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Run on a PTY (interactive), with this terminal's size.
    pub tty: bool,
}

type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, frame: &Frame) -> std::io::Result<()> {
    write_frame(&mut *w.lock().unwrap_or_else(|e| e.into_inner()), frame)
}

fn write_fd(fd: i32, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writes from a valid slice to a descriptor we were given.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

fn window_size() -> WinSize {
    // SAFETY: TIOCGWINSZ writes one winsize; failure leaves the default.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    for fd in [1, 0, 2] {
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return WinSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
        }
    }
    WinSize { rows: 24, cols: 80 }
}

/// Waits for forwarded signals: window changes become resizes, the rest are
/// sent to the guest process (which then exits and ends this client).
fn relay_signals(set: libc::sigset_t, w: Writer) {
    loop {
        let mut sig = 0;
        // SAFETY: sigwait on signals blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let msg = if sig == libc::SIGWINCH {
            Control::Resize {
                id: 1,
                size: window_size(),
            }
        } else {
            Control::Kill { id: 1, signal: sig }
        };
        if send(&w, &Frame::Control(msg)).is_err() {
            return;
        }
    }
}

/// Copies standard input up, never more than the agent's credit ahead.
fn pump_stdin(stdin: std::fs::File, w: Writer, credit: Arc<(Mutex<u32>, Condvar)>) {
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let allowed = {
            let (lock, cv) = &*credit;
            let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
            while *c == 0 {
                c = cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            (*c as usize).min(MAX_DATA)
        };
        let n = match (&stdin).read(&mut buf[..allowed]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            let _ = send(&w, &Frame::Control(Control::CloseStdin { id: 1 }));
            return;
        }
        *credit.0.lock().unwrap_or_else(|e| e.into_inner()) -= n as u32;
        let frame = Frame::Data {
            id: 1,
            stream: Stream::Stdin,
            bytes: buf[..n].to_vec(),
        };
        if send(&w, &frame).is_err() {
            return;
        }
    }
}

/// Where a command's streams go on this side.
#[derive(Clone, Copy, Debug)]
pub struct Io {
    /// The descriptor the command's input is read from, until its end
    /// (None: the command's input is closed). It must stay open until the
    /// command ends.
    pub stdin: Option<i32>,
    /// Descriptors the command's output and errors are written to.
    pub stdout: i32,
    pub stderr: i32,
    /// Pass SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process on to
    /// the command (a terminal's client). A library caller in a process with
    /// signal handling of its own (the session process) says no.
    pub signals: bool,
}

impl Default for Io {
    /// This process's own standard input, output and error.
    fn default() -> Io {
        Io {
            stdin: Some(0),
            stdout: 1,
            stderr: 2,
            signals: true,
        }
    }
}

/// Runs `req` in the session with this process's stdio and returns its
/// exit status.
pub fn exec(dir: &Dir, req: Request) -> Result<u8> {
    exec_with(dir, req, Io::default())
}

/// Runs the shell `script` in the session as `user` (None: the session's
/// default), from `/`, with its standard input closed, its output written
/// to `stdout` and its errors to this process's; returns its status.
pub fn script(dir: &Dir, script: &str, user: Option<&str>, stdout: i32) -> Result<u8> {
    let req = Request {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: Some("/".into()),
        user: user.map(str::to_string),
        tty: false,
    };
    let io = Io {
        stdin: None,
        stdout,
        stderr: 2,
        signals: true,
    };
    exec_with(dir, req, io)
}

/// Runs `req` in the session with its streams as `io` says.
pub fn exec_with(dir: &Dir, req: Request, io: Io) -> Result<u8> {
    let stream = UnixStream::connect(dir.ctl_path()).at(|| {
        format!(
            "cannot reach session `{}` at {} (is it still running? `sbx ls`)",
            dir.name,
            dir.ctl_path().display()
        )
    })?;
    let mut env = req.env;
    if req.tty {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        env.push(("TERM".into(), term));
    }
    let exec = ExecRequest {
        id: 1,
        argv: req.argv,
        env,
        cwd: req.cwd,
        user: req.user,
        pty: req.tty.then(window_size),
    };
    let w: Writer = Arc::new(Mutex::new(
        stream
            .try_clone()
            .at(|| "cannot use the control connection".into())?,
    ));
    send(&w, &Frame::Control(Control::Exec(exec))).at(|| "cannot send the command".into())?;

    // Signals this client turns into messages instead of dying of them,
    // blocked here and in every thread started below; `relay_signals` takes
    // them with sigwait.
    if io.signals {
        let mut forwarded = vec![libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
        if req.tty {
            forwarded.push(libc::SIGWINCH);
        }
        let set = block_signals(&forwarded);
        let w = w.clone();
        std::thread::spawn(move || relay_signals(set, w));
    }
    let credit = Arc::new((Mutex::new(INITIAL_CREDIT), Condvar::new()));
    if let Some(fd) = io.stdin {
        // The pump reads a copy of the descriptor, which it owns: it may
        // outlive this call (blocked in a read), and the caller may close
        // its own as soon as this returns.
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open for
        // this call; the result is checked and owned from here on.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error())
                .at(|| "cannot use the command's input".into());
        }
        // SAFETY: `copy` is a new descriptor nothing else owns.
        let stdin = unsafe { std::fs::File::from_raw_fd(copy) };
        let (w, credit) = (w.clone(), credit.clone());
        std::thread::spawn(move || pump_stdin(stdin, w, credit));
    } else {
        send(&w, &Frame::Control(Control::CloseStdin { id: 1 }))
            .at(|| "cannot send the command".into())?;
    }
    let raw = if req.tty {
        RawMode::enter_fully(0)
    } else {
        None
    };

    let mut frames = FrameIo::new(stream);
    let mut error: Option<String> = None;
    let status = loop {
        let frame = match frames.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => break None,
        };
        match frame {
            Frame::Data { stream, bytes, .. } => {
                let fd = if stream == Stream::Stderr {
                    io.stderr
                } else {
                    io.stdout
                };
                write_fd(fd, &bytes).at(|| "cannot write the command's output".into())?;
            }
            Frame::Control(Control::Credit {
                stream: Stream::Stdin,
                bytes,
                ..
            }) => {
                let (lock, cv) = &*credit;
                let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
                *c = c.saturating_add(bytes).min(INITIAL_CREDIT);
                cv.notify_one();
            }
            Frame::Control(Control::Error { message, .. }) => error = Some(message),
            Frame::Control(Control::Exited { code, signal, .. }) => {
                break Some(match (code, signal) {
                    (Some(c), _) => c.clamp(0, 255) as u8,
                    (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
                    (None, None) => 1,
                });
            }
            _ => {}
        }
    };
    drop(raw);
    if let Some(message) = &error {
        // The guest agent chose these words: shown as text, not markup.
        eprintln!("sbx: {}", sbx_audit::printable(message));
    }
    match status {
        Some(code) => Ok(code),
        None => fail!(
            Session,
            "session `{}` closed the connection before the command finished (did the session stop? `sbx ls`)",
            dir.name
        ),
    }
}
