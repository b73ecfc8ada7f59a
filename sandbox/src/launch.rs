//! Sessions from the outside: starting one (its session process detached,
//! reading the spec from the session's directory) and stopping one.

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sbx_protocol::agent::{write_frame, Control, Frame, FrameIo};

use crate::error::{fail, At, Error, Result};
use crate::spec::SessionSpec;
use crate::state::{Dir, Phase};
use crate::{paths, sys};

/// How long a start waits for the guest agent.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The first of `s1`, `s2`, ... that names no session.
pub fn first_free_name() -> String {
    (1..)
        .map(|i| format!("s{i}"))
        .find(|n| !paths::runtime_dir().join(n).exists())
        .expect("some name is free")
}

/// The last lines of a log, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts the session `spec` describes and returns once its guest agent
/// is ready. `sbx` is the sbx binary, whose hidden `__session` command is
/// the session process; it runs detached, in a process group of its own,
/// with its output in the session's `sbx.log`. `starting` is called once
/// the session's directory is made, just before the process starts.
pub fn start(spec: &SessionSpec, sbx: &Path, starting: impl FnOnce()) -> Result<Dir> {
    spec.validate()?;
    let name = &spec.name;
    let dir = Dir::new(name)?;
    paths::private_dir(&paths::runtime_dir())?;
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir.path) {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let state = dir
                .status()
                .map_or_else(|_| "unknown".to_string(), |i| i.state.to_string());
            fail!(Invalid, "session `{name}` already exists ({state}); choose another --name, or `sbx rm {name}` first");
        }
        return Err(e).at(|| format!("cannot create {}", dir.path.display()));
    }
    // A disk the session had before (see `disks`) is kept whatever happens;
    // one this start made goes with a failed start.
    let had_disk = crate::disks::layer_path(name).exists();
    let result = spawn(spec, &dir, sbx, starting).and_then(|()| {
        if spec.clone_workspace {
            crate::workspace::clone_into(&dir, spec.user.as_deref()).inspect_err(|_| {
                if let Ok(info) = dir.read_info() {
                    end_process(&dir, info.pid, Duration::from_secs(5));
                }
            })?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir.path);
        if !had_disk {
            let _ = crate::disks::remove_layer(name);
        }
    }
    result.map(|()| dir)
}

/// Starts a stopped (or dead) session again from the spec it was started
/// with: a session booted from an image comes back with its disk, and so
/// with everything written to it.
pub fn restart(name: &str, sbx: &Path, starting: impl FnOnce()) -> Result<Dir> {
    let (dir, info) = Dir::existing(name)?;
    if info.state.is_alive() {
        fail!(Invalid, "session `{name}` is already {}", info.state);
    }
    let spec = SessionSpec::read(&dir.spec_path())?;
    spec.validate()?;
    spawn(&spec, &dir, sbx, starting)?;
    Ok(dir)
}

fn spawn(spec: &SessionSpec, dir: &Dir, sbx: &Path, starting: impl FnOnce()) -> Result<()> {
    spec.write(&dir.spec_path())?;
    let log = std::fs::File::create(dir.log_path())
        .at(|| format!("cannot create {}", dir.log_path().display()))?;
    let (read_end, write_end) = sys::pipe()?;
    let mut cmd = Command::new(sbx);
    cmd.arg("__session")
        .arg(&spec.name)
        .args(["--ready-fd", "3"]);
    let fd = write_end.as_raw_fd();
    let stdout = log
        .try_clone()
        .at(|| format!("cannot open {}", dir.log_path().display()))?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec: a session
    // of its own (no terminal signals from this shell), and the pipe as fd 3.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    starting();
    let child = cmd.spawn();
    drop(write_end);
    let mut child = child.at(|| "cannot start the session process".into())?;
    let line = sys::read_line_within(read_end, START_TIMEOUT);
    match line.as_deref() {
        Some("ok") => Ok(()),
        other => {
            // The session process ends on its own after an error; a hang is killed.
            if other.is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
            let why = match other {
                Some(l) => l.strip_prefix("error: ").unwrap_or(l).to_string(),
                None => format!(
                    "the session process ended or hung before the guest was ready:\n{}",
                    tail(&dir.log_path(), 20)
                ),
            };
            Err(Error::Session(format!(
                "cannot start session `{}`: {why}",
                spec.name
            )))
        }
    }
}

fn wait_dead(dir: &Dir, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while dir.alive() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// How [`stop`] says the guest shut down as asked.
pub const STOPPED: &str = "stopped";

/// Asks the guest agent to shut down; then SIGTERM (the VMM stops the VM);
/// then SIGKILL. Records the stop and returns how it ended.
pub fn stop(dir: &Dir, pid: u32, timeout: Duration) -> &'static str {
    let graceful = (|| -> Result<()> {
        let io = |e| Error::Io {
            what: "cannot ask the guest agent to shut down".into(),
            error: e,
        };
        let mut s = std::os::unix::net::UnixStream::connect(dir.ctl_path()).map_err(io)?;
        write_frame(&mut s, &Frame::Control(Control::Shutdown)).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        match FrameIo::new(s).read_frame() {
            Ok(Some(Frame::Control(Control::Shutdown))) => Ok(()),
            other => fail!(Session, "unexpected answer {other:?}"),
        }
    })();
    let how = if graceful.is_ok() && wait_dead(dir, timeout) {
        STOPPED
    } else {
        end_process(dir, pid, Duration::from_secs(3))
    };
    mark_stopped(dir, how);
    how
}

/// Pauses a running session's VM (its vCPUs stop, its memory is kept) or
/// resumes a paused one, through its control socket.
pub fn pause(dir: &Dir, pause: bool) -> Result<()> {
    let what = if pause { "pause" } else { "resume" };
    let io = |e| Error::Io {
        what: format!("cannot ask session `{}` to {what}", dir.name),
        error: e,
    };
    let mut s = std::os::unix::net::UnixStream::connect(dir.ctl_path()).map_err(io)?;
    let ask = if pause {
        Control::Pause
    } else {
        Control::Resume
    };
    write_frame(&mut s, &Frame::Control(ask)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    match FrameIo::new(s).read_frame() {
        Ok(Some(Frame::Control(Control::Paused))) if pause => Ok(()),
        Ok(Some(Frame::Control(Control::Resumed))) if !pause => Ok(()),
        Ok(Some(Frame::Control(Control::Error { message, .. }))) => fail!(Session, "{message}"),
        other => fail!(
            Session,
            "session `{}` gave no answer to {what} ({other:?})",
            dir.name
        ),
    }
}

/// SIGTERM to the session process (its VMM ends the VM at once), then
/// SIGKILL if it is still there after `grace`. Returns how it ended.
pub fn end_process(dir: &Dir, pid: u32, grace: Duration) -> &'static str {
    let pid = pid as libc::pid_t;
    // SAFETY: signals the session process, whose lock we saw held.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if wait_dead(dir, grace) {
        return "stopped (the VM was ended by the VMM)";
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_dead(dir, Duration::from_secs(5));
    "killed"
}

/// Records a stop the session process could not record itself.
fn mark_stopped(dir: &Dir, why: &str) {
    if let Ok(mut info) = dir.read_info() {
        if info.state != Phase::Stopped {
            info.state = Phase::Stopped;
            info.exit = Some(why.to_string());
            let _ = dir.write_info(&info);
        }
    }
    for p in [dir.ctl_path(), dir.vsock_path()] {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes a session that is not running: its directory and its disk.
pub fn remove(dir: &Dir) -> Result<()> {
    std::fs::remove_dir_all(&dir.path).at(|| format!("cannot remove {}", dir.path.display()))?;
    crate::disks::remove_layer(&dir.name)
}
