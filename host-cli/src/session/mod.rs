//! Sessions: long-lived sandboxes, one process each and no daemon.
//! `sbx start` launches the session process (`runner`) detached and waits
//! until its guest agent is ready; `exec`, `shell`, `stop` talk to it over
//! its control socket; `ls` and `rm` read and remove its directory.

pub mod client;
pub mod egress;
mod host_edits;
pub mod mounts;
pub mod runner;
pub mod state;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sbx_protocol::agent::{write_frame, Control, Frame, FrameIo};

use crate::{paths, policy_cmd};
use state::{Dir, Phase};

/// How long `sbx start` waits for the guest agent.
const START_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx start                      start a session with a generated name (printed)
  sbx start --name s1 --vcpus 2 --mem 1024
  sbx exec s1 -- uname -a

The session runs in the background until `sbx stop`. The policy (see `sbx
policy show`) must allow its vCPUs and memory; every decision and guest
event goes to its audit log (`sbx events NAME`).")]
pub struct StartArgs {
    /// Session name (letters, digits, '-', '_', '.'); default: s1, s2, ...
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(clap::Args, Clone)]
pub struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Uncompressed ELF kernel (default: $SBX_KERNEL or the one `cargo xtask kernel` built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (default: $SBX_INITRD or the one `cargo xtask rootfs` built).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = vmm::host::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
    /// Share a host directory at a guest path, read-only unless `:rw`
    /// (repeatable). The policy's deny rules apply inside it.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro|rw]")]
    mounts: Vec<String>,
    /// Do not share the current directory (read-write at /workspace, where
    /// commands then start).
    #[arg(long)]
    no_workspace: bool,
    /// How long the guest may trust what it learnt about shared files:
    /// auto (names, attributes and data for 60 s, and the host watched: a
    /// host edit reaches the guest in about 50 ms, repeated scans such as
    /// `git status` run near host speed; the default), always (the same
    /// without the watch: host edits can take a minute to show; for
    /// directories only the guest changes), never (nothing cached: host
    /// edits show at once, but every access asks the host: slowest).
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "never", "always"])]
    fs_cache: String,
    /// Also trust this CA (PEM) for the egress proxy's TLS to upstream
    /// hosts, besides the system roots (a corporate proxy's CA, a local
    /// test server's). Repeatable.
    #[arg(long, value_name = "PEM")]
    upstream_ca: Vec<PathBuf>,
    /// Have the egress proxy resolve NAME to ADDR, like curl's --resolve
    /// (repeatable). The policy still checks the address: a private or
    /// loopback one needs a network rule that names it.
    #[arg(long, value_name = "NAME:ADDR")]
    resolve: Vec<String>,
    #[command(flatten)]
    select: policy_cmd::Select,
}

impl VmArgs {
    /// The workspace (unless --no-workspace) and every --mount, checked.
    fn mount_specs(&self) -> anyhow::Result<Vec<mounts::MountSpec>> {
        let mut specs = Vec::new();
        if !self.no_workspace {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            specs.push(mounts::MountSpec::workspace(&cwd)?);
        }
        for m in &self.mounts {
            specs.push(mounts::MountSpec::parse(m)?);
        }
        Ok(specs)
    }
}

#[derive(clap::Args)]
pub struct CommandArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long, short, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short, value_name = "DIR")]
    workdir: Option<String>,
    /// User (name or uid) to run as; root by default.
    #[arg(long, short)]
    user: Option<String>,
    /// Run on a terminal (PTY) in the guest, as `sbx shell` does.
    #[arg(long, short)]
    tty: bool,
}

impl CommandArgs {
    fn request(&self, argv: Vec<String>) -> anyhow::Result<client::Request> {
        let env = self
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => bail!("--env {kv:?} is not NAME=VALUE"),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(client::Request {
            argv,
            env,
            cwd: self.workdir.clone(),
            user: self.user.clone(),
            tty: self.tty,
        })
    }
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx exec s1 -- ls -la /
  echo hi | sbx exec s1 -- tr a-z A-Z
  sbx exec s1 -e FOO=bar -w /tmp -- sh -c 'echo $FOO; pwd'

Standard input, output and error pass through unchanged, and the exit status
is the command's own (125: sbx failed; 126: refused or not runnable; 127: not
found in the guest).")]
pub struct ExecArgs {
    /// The session to run in.
    name: String,
    #[command(flatten)]
    opts: CommandArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
#[command(after_help = "\
Example:
  sbx shell s1             a shell on a PTY; `exit` or Ctrl-D leaves it

Window size changes follow the terminal and Ctrl-C goes to the guest.")]
pub struct ShellArgs {
    name: String,
    /// User (name or uid) to log in as; root by default.
    #[arg(long, short)]
    user: Option<String>,
    /// Shell to run.
    #[arg(long, default_value = "/bin/sh")]
    shell: String,
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// One JSON object per session, in an array.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct StopArgs {
    name: String,
    /// Seconds to wait for a graceful stop before killing the session.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Sessions to remove.
    #[arg(required = true)]
    names: Vec<String>,
    /// Stop running sessions first instead of refusing.
    #[arg(long, short)]
    force: bool,
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx run -- uname -a
  sbx run --vcpus 2 -- sh -c 'echo out; echo err >&2; exit 7'   # exits 7

Starts a session, runs the command in it, stops and removes the session,
and exits with the command's status.")]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    opts: CommandArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Blocks `signals` in this thread and every thread it starts afterwards;
/// returns the set, for sigwait.
pub(crate) fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: plain libc calls on a locally owned sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn first_free_name() -> String {
    (1..)
        .map(|i| format!("s{i}"))
        .find(|n| !paths::runtime_dir().join(n).exists())
        .expect("some name is free")
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The last lines of a log, for error messages.
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts a session and returns once its guest agent is ready.
fn start_session(name: &str, vm: &VmArgs, quiet: bool) -> anyhow::Result<Dir> {
    let dir = Dir::new(name)?;
    // Bad mounts are the caller's typo: say so before anything starts.
    let specs = vm.mount_specs()?;
    let root = paths::runtime_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir.path) {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let state = dir
                .status()
                .map_or_else(|_| "unknown".to_string(), |i| i.state.to_string());
            bail!("session `{name}` already exists ({state}); choose another --name, or `sbx rm {name}` first");
        }
        return Err(e).with_context(|| format!("cannot create {}", dir.path.display()));
    }
    let log = std::fs::File::create(dir.log_path())
        .with_context(|| format!("cannot create {}", dir.log_path().display()))?;
    let (read_end, write_end) = pipe()?;
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the sbx binary")?);
    cmd.arg("__session")
        .args(["--name", name])
        .args(["--vcpus", &vm.vcpus.to_string()])
        .args(["--mem", &vm.mem.to_string()])
        .arg("--kvm")
        .arg(&vm.kvm)
        .args(["--ready-fd", "3"])
        .args(["--fs-cache", &vm.fs_cache])
        .args(vm.select.to_args());
    for m in &specs {
        cmd.arg("--mount").arg(m.to_arg());
    }
    for r in &vm.resolve {
        egress::parse_resolve(r)?;
        cmd.arg("--resolve").arg(r);
    }
    for ca in &vm.upstream_ca {
        let ca = std::fs::canonicalize(ca)
            .with_context(|| format!("--upstream-ca {}: cannot read it", ca.display()))?;
        cmd.arg("--upstream-ca").arg(ca);
    }
    if let Some(k) = &vm.kernel {
        cmd.arg("--kernel").arg(k);
    }
    if let Some(i) = &vm.initrd {
        cmd.arg("--initrd").arg(i);
    }
    let fd = write_end.as_raw_fd();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
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
    if !quiet {
        eprintln!(
            "sbx: starting session `{name}` ({} vCPU, {} MiB)...",
            vm.vcpus, vm.mem
        );
    }
    let started = Instant::now();
    let child = cmd.spawn().context("cannot start the session process");
    drop(write_end);
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir.path);
            return Err(e);
        }
    };
    let line = read_ready(read_end, START_TIMEOUT);
    match line.as_deref() {
        Some("ok") => {
            if !quiet {
                eprintln!(
                    "sbx: session `{name}` is ready ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(dir)
        }
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
            let _ = std::fs::remove_dir_all(&dir.path);
            bail!("cannot start session `{name}`: {why}")
        }
    }
}

/// One line from the session process, or None on EOF or timeout.
fn read_ready(fd: OwnedFd, timeout: Duration) -> Option<String> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: polls one descriptor we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    let mut line = String::new();
    BufReader::new(std::fs::File::from(fd))
        .read_line(&mut line)
        .ok()?;
    let line = line.trim_end().to_string();
    (!line.is_empty()).then_some(line)
}

pub fn start(a: StartArgs) -> anyhow::Result<u8> {
    let name = a.name.clone().unwrap_or_else(first_free_name);
    start_session(&name, &a.vm, false)?;
    println!("{name}");
    Ok(0)
}

pub fn exec(a: ExecArgs) -> anyhow::Result<u8> {
    let dir = Dir::running(&a.name)?;
    client::exec(&dir, a.opts.request(a.command)?)
}

pub fn shell(a: ShellArgs) -> anyhow::Result<u8> {
    let dir = Dir::running(&a.name)?;
    client::exec(
        &dir,
        client::Request {
            argv: vec![a.shell],
            env: Vec::new(),
            cwd: None,
            user: a.user,
            tty: true,
        },
    )
}

fn uptime(info: &state::Info) -> String {
    if !matches!(info.state, Phase::Running | Phase::Starting) {
        return "-".into();
    }
    let s = state::unix_secs().saturating_sub(info.started);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn ls(a: LsArgs) -> anyhow::Result<u8> {
    let sessions: Vec<state::Info> = state::all()
        .iter()
        .filter_map(|d| d.status().ok())
        .collect();
    if a.json {
        let docs: Vec<serde_json::Value> = sessions
            .iter()
            .map(|i| {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                v["uptime_s"] = match i.state {
                    Phase::Running | Phase::Starting => {
                        state::unix_secs().saturating_sub(i.started).into()
                    }
                    _ => serde_json::Value::Null,
                };
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<9} {:>8} {:>5} {:>8} {:>8}",
        "NAME", "STATE", "UPTIME", "VCPUS", "MEM", "PID"
    );
    for i in &sessions {
        println!(
            "{:<20} {:<9} {:>8} {:>5} {:>7}M {:>8}",
            i.name,
            i.state,
            uptime(i),
            i.vcpus,
            i.mem_mib,
            i.pid
        );
    }
    Ok(0)
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

/// Asks the guest agent to shut down; then SIGTERM (the VMM stops the VM);
/// then SIGKILL. Returns how it ended.
fn stop_session(dir: &Dir, pid: u32, timeout: Duration) -> &'static str {
    let graceful = (|| -> anyhow::Result<()> {
        let mut s = std::os::unix::net::UnixStream::connect(dir.ctl_path())?;
        write_frame(&mut s, &Frame::Control(Control::Shutdown))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        match FrameIo::new(s).read_frame()? {
            Some(Frame::Control(Control::Shutdown)) => Ok(()),
            other => bail!("unexpected answer {other:?}"),
        }
    })();
    if graceful.is_ok() && wait_dead(dir, timeout) {
        return "stopped";
    }
    end_process(dir, pid, Duration::from_secs(3))
}

/// SIGTERM to the session process (its VMM ends the VM at once), then
/// SIGKILL if it is still there after `grace`. Returns how it ended.
fn end_process(dir: &Dir, pid: u32, grace: Duration) -> &'static str {
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

pub fn stop(a: StopArgs) -> anyhow::Result<u8> {
    let (dir, info) = Dir::existing(&a.name)?;
    if !matches!(info.state, Phase::Running | Phase::Starting) {
        bail!("session `{}` is not running (it is {})", a.name, info.state);
    }
    let how = stop_session(&dir, info.pid, Duration::from_secs(a.timeout));
    mark_stopped(&dir, how);
    eprintln!("sbx: session `{}` {how}", a.name);
    Ok(0)
}

pub fn rm(a: RmArgs) -> anyhow::Result<u8> {
    for name in &a.names {
        let (dir, info) = Dir::existing(name)?;
        if matches!(info.state, Phase::Running | Phase::Starting) {
            if !a.force {
                bail!("session `{name}` is running; `sbx stop {name}` first, or `sbx rm --force {name}`");
            }
            let how = stop_session(&dir, info.pid, Duration::from_secs(10));
            mark_stopped(&dir, how);
        }
        std::fs::remove_dir_all(&dir.path)
            .with_context(|| format!("cannot remove {}", dir.path.display()))?;
        eprintln!("sbx: removed session `{name}`");
    }
    Ok(0)
}

pub fn run(a: RunArgs) -> anyhow::Result<u8> {
    let name = format!("run-{}-{}", std::process::id(), state::unix_secs());
    let dir = start_session(&name, &a.vm, true)?;
    let result = a
        .opts
        .request(a.command)
        .and_then(|req| client::exec(&dir, req));
    // Ephemeral: nothing in the guest is worth a graceful shutdown.
    if let Ok(info) = dir.read_info() {
        end_process(&dir, info.pid, Duration::from_secs(10));
    }
    let _ = std::fs::remove_dir_all(&dir.path);
    result
}
