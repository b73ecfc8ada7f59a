//! Starting one requested process: argv, env, cwd, user, and pipes or a PTY.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;

use sbx_protocol::agent::{ExecRequest, WinSize};

pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Process {
    pub pid: libc::pid_t,
    /// Where input goes: the pipe, or the PTY master.
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    /// None on a PTY, where both streams arrive on `stdout`.
    pub stderr: Option<File>,
    /// The PTY master, for window size changes.
    pub pty: Option<File>,
    pub status: Receiver<libc::c_int>,
}

/// Why a process could not start, with the exit code a shell would give.
pub struct SpawnError {
    pub message: String,
    pub code: i32,
}

struct User {
    uid: u32,
    gid: u32,
    home: String,
    name: String,
}

/// The user's groups from /etc/group, the primary one first (what a
/// login gives, so `agent` is in `sudo` as the image says).
fn groups_of(user: &User) -> Vec<libc::gid_t> {
    let mut groups = vec![user.gid];
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == user.name) {
            if let Ok(gid) = f[2].parse() {
                if !groups.contains(&gid) {
                    groups.push(gid);
                }
            }
        }
    }
    groups
}

/// A user name from /etc/passwd, or a numeric uid (gid = uid) for users the
/// image does not list.
fn resolve_user(spec: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == spec || f[2] == spec) {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok(User {
                    uid,
                    gid,
                    home: f[5].to_string(),
                    name: f[0].to_string(),
                });
            }
        }
    }
    match spec.parse::<u32>() {
        Ok(uid) => Ok(User {
            uid,
            gid: uid,
            home: "/".into(),
            name: spec.into(),
        }),
        Err(_) => Err(format!("no user {spec:?} in the guest's /etc/passwd")),
    }
}

fn openpty(size: WinSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors; name and termios are optional.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    unsafe {
        libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)))
    }
}

pub fn set_winsize(pty: &File, size: WinSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Where commands run when the request names no directory: the workspace
/// when the host shared one (`sbx.workdir=`), else `/`.
static DEFAULT_CWD: OnceLock<String> = OnceLock::new();

pub fn set_default_cwd(dir: Option<String>) {
    if let Some(d) = dir {
        let _ = DEFAULT_CWD.set(d);
    }
}

/// Environment every process gets before the request's own (the egress
/// proxy settings when the session has egress).
static DEFAULT_ENV: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();

pub fn set_default_env(env: Vec<(&'static str, String)>) {
    let _ = DEFAULT_ENV.set(env);
}

fn default_cwd() -> String {
    DEFAULT_CWD.get().cloned().unwrap_or_else(|| "/".into())
}

pub fn spawn(req: &ExecRequest) -> Result<Process, SpawnError> {
    let fail = |message: String, code| SpawnError { message, code };
    let Some(program) = req.argv.first() else {
        return Err(fail("empty command".into(), 127));
    };
    let cwd = req.cwd.clone().unwrap_or_else(default_cwd);
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(fail(format!("{cwd}: no such directory in the guest"), 126));
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("USER", "root")
        .current_dir(cwd.as_str());
    if let Some(spec) = &req.user {
        let user = resolve_user(spec).map_err(|m| fail(m, 126))?;
        let groups = groups_of(&user);
        let (uid, gid) = (user.uid, user.gid);
        // std's `uid` would drop every supplementary group; set them here.
        // SAFETY: only async-signal-safe calls between fork and exec, on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.env("HOME", &user.home).env("USER", &user.name);
    }
    for (k, v) in DEFAULT_ENV.get().into_iter().flatten() {
        cmd.env(k, v);
    }
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    let pty = match req.pty {
        Some(size) => {
            let (master, slave) =
                openpty(size).map_err(|e| fail(format!("cannot open a PTY: {e}"), 126))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| fail(format!("cannot open a PTY: {e}"), 126))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: only async-signal-safe calls between fork and exec: a
            // new session whose controlling terminal is the PTY, so that
            // Ctrl-C and job control work.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    libc::ioctl(0, libc::TIOCSCTTY, 0);
                    Ok(())
                });
            }
            Some(master)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // A process group of its own, so that a signal from the host
            // reaches the whole pipeline it starts.
            cmd.process_group(0);
            None
        }
    };
    let spawned = crate::reaper::spawn_watched(|| {
        let child = cmd.spawn()?;
        Ok((child.id() as libc::pid_t, child))
    });
    let (pid, mut child, status) = spawned.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            fail(format!("{program}: command not found in the guest"), 127)
        }
        std::io::ErrorKind::PermissionDenied => {
            fail(format!("{program}: permission denied in the guest"), 126)
        }
        _ => fail(format!("{program}: cannot start: {e}"), 126),
    })?;
    let file = |fd: Option<OwnedFd>| fd.map(File::from);
    Ok(match pty {
        Some(master) => {
            let master = File::from(master);
            let input = master.try_clone().ok();
            let output = master.try_clone().ok();
            Process {
                pid,
                stdin: input,
                stdout: output,
                stderr: None,
                pty: Some(master),
                status,
            }
        }
        None => Process {
            pid,
            stdin: file(child.stdin.take().map(OwnedFd::from)),
            stdout: file(child.stdout.take().map(OwnedFd::from)),
            stderr: file(child.stderr.take().map(OwnedFd::from)),
            pty: None,
            status,
        },
    })
}
