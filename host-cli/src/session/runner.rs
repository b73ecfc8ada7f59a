//! The session process: one per session, started detached by `sbx start`
//! (`sbx __session`). It owns the VM, the session's audit log and its
//! control socket, and lives exactly as long as the VM.
//!
//! Threads: the VMM's (vCPUs, vsock worker, event loop on the main thread),
//! one reading the guest agent's events, one accepting control connections.
//! An exec request is checked against the policy and audited here; the
//! client's socket is then handed to the vsock device, which moves its bytes
//! to the guest agent directly.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use sbx_audit::{AuditLog, Category, Event};
use sbx_policy::{Policy, Surface};
use sbx_protocol::agent::{
    encode, write_frame, Control, EventKind, Frame, FrameIo, GuestEvent, AGENT_PORT, EVENTS_PORT,
    VERSION,
};
use vmm::devices::virtio::fs::FsCache;
use vmm::devices::virtio::vsock::{VsockConfig, VsockHost};
use vmm::{BootTimings, Console, VmConfig};

use super::egress::Egress;
use super::host_edits;
use super::mounts::{self, FileAudit, MountSpec};
use super::state::{self, Dir, Info, Phase};
use crate::{boot, policy_cmd};

/// The guest's vsock address (each VM has a device of its own).
const GUEST_CID: u32 = 3;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub vcpus: u32,
    #[arg(long)]
    pub mem: u64,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub kvm: PathBuf,
    /// Descriptor of the pipe on which to report readiness to `sbx start`.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// HOST:GUEST:ro|rw, as `sbx start` resolved them.
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    #[arg(long, default_value = "auto")]
    pub fs_cache: String,
    #[arg(long)]
    pub upstream_ca: Vec<PathBuf>,
    #[arg(long)]
    pub resolve: Vec<String>,
    #[command(flatten)]
    pub select: policy_cmd::Select,
}

/// The pipe to `sbx start`: one line, `ok` or `error: ...`, then closed.
struct Ready(Mutex<Option<std::fs::File>>);

impl Ready {
    fn report(&self, line: &str) {
        if let Some(mut f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writeln!(f, "{line}");
        }
    }
}

type SharedInfo = Arc<Mutex<Info>>;

fn set_phase(dir: &Dir, info: &SharedInfo, phase: Phase, exit: Option<String>) {
    let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
    i.state = phase;
    i.exit = exit;
    if let Err(e) = dir.write_info(&i) {
        tracing::warn!("{e:#}");
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    // Every thread inherits this mask, so SIGINT, SIGTERM and SIGHUP reach
    // the VMM's signalfd (a graceful VM stop) and never kill a helper thread.
    super::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    // A client that goes away mid-write is that connection's problem, not
    // the session's: writes to it fail with EPIPE instead of killing us.
    // SAFETY: sets a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: the descriptor was set up for us by `sbx start` and is ours alone.
    let ready = Arc::new(Ready(Mutex::new(
        args.ready_fd
            .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) }),
    )));
    raise_fd_limit();
    let result = serve(&args, &ready);
    if let Err(e) = &result {
        ready.report(&format!("error: {e:#}"));
    }
    result
}

/// The file devices hold one descriptor per inode the guest knows (a
/// `find` over a big tree knows tens of thousands): lift the limit as far as
/// this process may (root may raise the hard limit up to fs.nr_open).
fn raise_fd_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: nr_open.max(lim.rlim_max),
            rlim_max: nr_open.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit; big shared trees may fail with EMFILE"
                );
            }
        }
    }
}

fn serve(args: &Args, ready: &Arc<Ready>) -> anyhow::Result<u8> {
    let dir = Dir::new(&args.name)?;
    let _lock = state::hold_lock(&dir.lock_path())?;
    let info: SharedInfo = Arc::new(Mutex::new(Info {
        name: args.name.clone(),
        pid: std::process::id(),
        started: state::unix_secs(),
        vcpus: args.vcpus,
        mem_mib: args.mem,
        state: Phase::Starting,
        exit: None,
    }));
    dir.write_info(&info.lock().unwrap_or_else(|e| e.into_inner()))?;

    let (kernel, initrd) = boot::guest_images(&args.kvm, args.kernel.clone(), args.initrd.clone())?;
    let mut policy = args.select.load().context("cannot load the policy")?;
    let log = Arc::new(boot::open_audit_log(
        &args.name, &policy, args.vcpus, args.mem,
    )?);
    let specs = args
        .mounts
        .iter()
        .map(|m| MountSpec::parse(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cache = FsCache::parse(&args.fs_cache)
        .with_context(|| format!("--fs-cache {}: not auto, never or always", args.fs_cache))?;
    mounts::grant(&mut policy, &specs, &log)?;
    let policy = Arc::new(policy);
    let host = VsockHost::new().context("cannot set up the vsock device")?;
    let files = FileAudit::new(
        policy.clone(),
        log.clone(),
        host_edits::start(host.clone())?,
    )?;
    let (fs, mut fs_words) = mounts::devices(&policy, &log, cache, files.clone())?;
    if specs.iter().any(|m| m.guest == mounts::WORKSPACE) {
        fs_words.push(format!("sbx.workdir={}", mounts::WORKSPACE));
    }

    let egress = Egress::start(
        &args.name,
        policy.clone(),
        log.clone(),
        &host,
        args.upstream_ca.clone(),
        &args.resolve,
    )?;
    fs_words.push(egress.cmdline_word());
    let guest_env = Arc::new(egress.guest_env());
    {
        let (events, log, dir, info, ready) = (
            host.listen(EVENTS_PORT),
            log.clone(),
            dir.clone(),
            info.clone(),
            ready.clone(),
        );
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || guest_events(events, &log, &dir, &info, &ready))?;
    }
    let _ = std::fs::remove_file(dir.ctl_path());
    let ctl = UnixListener::bind(dir.ctl_path())
        .with_context(|| format!("cannot listen on {}", dir.ctl_path().display()))?;
    {
        let (policy, log, host) = (policy.clone(), log.clone(), host.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in ctl.incoming().flatten() {
                    let (policy, log, host, env) =
                        (policy.clone(), log.clone(), host.clone(), guest_env.clone());
                    let _ = std::thread::Builder::new()
                        .name("request".into())
                        .spawn(move || request(conn, &policy, &log, &host, &env));
                }
            })?;
    }

    let config = VmConfig {
        kvm_path: args.kvm.clone(),
        kernel,
        initrd: Some(initrd),
        cmdline: boot::guest_cmdline(
            &format!("{} sbx.session {}", boot::BASE_CMDLINE, fs_words.join(" ")),
            &[],
        )?,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        lifetime: policy.lifetime().map(|(d, _)| d),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: Some(dir.vsock_path()),
            reserved_ports: vec![AGENT_PORT],
            host,
        }),
        fs,
    };
    let console = std::fs::File::create(dir.console_path())
        .with_context(|| format!("cannot create {}", dir.console_path().display()))?;
    let console = Console {
        output: Box::new(ConsoleWatch {
            file: console,
            line: Vec::new(),
            log: log.clone(),
        }),
        input: None,
    };
    let result = vmm::run(&config, console, BootTimings::new(Instant::now()));
    let ended = match &result {
        Ok(o) => o.reason.to_string(),
        Err(e) => format!("{e}"),
    };
    // The agent's first `agent_ready` is what made the session running.
    let was_ready = info.lock().unwrap_or_else(|e| e.into_inner()).state == Phase::Running;
    set_phase(&dir, &info, Phase::Stopped, Some(ended.clone()));
    let _ = std::fs::remove_file(dir.ctl_path());
    log.append(
        Category::Session,
        Event {
            action: "stop".into(),
            resource: args.name.clone(),
            details: serde_json::json!({ "exit_reason": ended }),
            ..Event::default()
        },
    )?;
    files.flush();
    // Helper threads still hold the log; the process exits right after.
    log.sync()?;
    if !was_ready {
        anyhow::bail!(
            "the VM stopped before the guest agent was ready ({ended}); the guest console is in {}",
            dir.console_path().display()
        );
    }
    Ok(0)
}

fn guest_event(log: &AuditLog, action: &str, resource: String, details: serde_json::Value) {
    let event = Event {
        action: action.into(),
        resource,
        details,
        ..Event::default()
    };
    if let Err(e) = log.append(Category::Guest, event) {
        tracing::error!("{e}");
    }
}

/// Records what the guest agent reports; the first `agent_ready` makes the
/// session running and tells `sbx start`.
fn guest_events(
    conns: std::sync::mpsc::Receiver<UnixStream>,
    log: &AuditLog,
    dir: &Dir,
    info: &SharedInfo,
    ready: &Ready,
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
            let details = serde_json::json!({ "id": id, "argv": argv, "code": code });
            match kind {
                EventKind::AgentReady => {
                    guest_event(log, "agent_ready", dir.name.clone(), details);
                    set_phase(dir, info, Phase::Running, None);
                    // Only the first report reaches `sbx start`.
                    ready.report("ok");
                }
                EventKind::ProcessStarted => {
                    guest_event(log, "process_started", argv.join(" "), details)
                }
                EventKind::ProcessExited => {
                    guest_event(log, "process_exited", argv.join(" "), details)
                }
                // The guest cannot be trusted to report its own crashes;
                // those come from the console (`ConsoleWatch`).
                EventKind::KernelPanic | EventKind::KernelOops => {}
            }
        }
    }
}

fn reply(stream: &mut UnixStream, c: Control) {
    let _ = write_frame(stream, &Frame::Control(c));
}

/// Serves one control connection: an exec (checked, audited, given the
/// secrets' placeholders, then handed to the guest agent), a shutdown, or a
/// hello.
fn request(
    mut conn: UnixStream,
    policy: &Policy,
    log: &AuditLog,
    host: &VsockHost,
    guest_env: &[(String, String)],
) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut frames = FrameIo::new(read_half);
    match frames.read_frame() {
        Ok(Some(Frame::Control(Control::Exec(mut req)))) => {
            // The caller's own -e settings come after, and win.
            req.env.splice(0..0, guest_env.iter().cloned());
            let argv0 = req.argv.first().cloned().unwrap_or_default();
            let d = policy.decide_exec(&argv0);
            let refusal = match log.decision(Surface::Exec, "exec", &req.argv.join(" "), &d) {
                Ok(true) => None,
                Ok(false) => Some(format!(
                    "policy denies exec {argv0}: {} (rule `{}`, {} layer, {})",
                    d.reason, d.rule.id, d.rule.layer, d.rule.location
                )),
                Err(e) => Some(format!("{e}")),
            };
            if let Some(message) = refusal {
                reply(
                    &mut conn,
                    Control::Error {
                        id: Some(req.id),
                        message,
                    },
                );
                reply(
                    &mut conn,
                    Control::Exited {
                        id: req.id,
                        code: Some(i32::from(crate::EXIT_SBX_ERROR)),
                        signal: None,
                    },
                );
                return;
            }
            let (stream, rest) = frames.into_parts();
            let mut prefix = Vec::new();
            encode(&Frame::Control(Control::Exec(req)), &mut prefix);
            prefix.extend(rest);
            host.attach(AGENT_PORT, stream, prefix);
        }
        Ok(Some(Frame::Control(Control::Shutdown))) => {
            match host.connect(AGENT_PORT, Duration::from_secs(5)) {
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
                message: "expected exec, shutdown or hello".into(),
            },
        ),
        Ok(None) | Err(_) => {}
    }
}

/// The guest console goes to `console.log`; kernel panics and oopses seen
/// there become guest events.
struct ConsoleWatch {
    file: std::fs::File,
    line: Vec<u8>,
    log: Arc<AuditLog>,
}

/// Console line prefixes (after the kernel's timestamp) that mean trouble.
const PANIC_MARKS: [&str; 1] = ["Kernel panic - not syncing"];
const OOPS_MARKS: [&str; 4] = ["Oops:", "BUG:", "general protection fault", "WARNING: CPU:"];

pub fn classify(line: &str) -> Option<EventKind> {
    if PANIC_MARKS.iter().any(|m| line.contains(m)) {
        Some(EventKind::KernelPanic)
    } else if OOPS_MARKS.iter().any(|m| line.contains(m)) {
        Some(EventKind::KernelOops)
    } else {
        None
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write_all(buf)?;
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                let action = match classify(&line) {
                    Some(EventKind::KernelPanic) => "kernel_panic",
                    Some(_) => "kernel_oops",
                    None => continue,
                };
                guest_event(
                    &self.log,
                    action,
                    "console".into(),
                    serde_json::json!({ "line": line.trim() }),
                );
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
            Some(EventKind::KernelPanic)
        );
        assert_eq!(
            classify("[    3.0] BUG: kernel NULL pointer dereference, address: 0"),
            Some(EventKind::KernelOops)
        );
        assert_eq!(classify("Oops: 0002 [#1] SMP"), Some(EventKind::KernelOops));
        assert_eq!(classify("hello from the guest"), None);
    }
}
