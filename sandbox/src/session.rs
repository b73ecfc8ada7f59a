//! The one place a session is assembled, in the order data flows: the
//! host and the guest's images, then the policy, then the audit log, then
//! the shares, then the disks (when the root is an image), then egress,
//! then the MCP gateway (when the spec names servers), then the VM's
//! configuration, then the VM.
//!
//! A running session's threads: the VMM's (vCPUs, the vsock and virtio-fs
//! workers, the event loop on the calling thread), `events` (the guest
//! agent's reports), `control` and one `request` thread per control
//! connection, `egress-accept` and one proxy thread per guest connection,
//! `file-events` (coalesced changes) and `host-edits` (the host's edits,
//! passed to the guest agent); with MCP servers, the gateway's
//! (`mcp-accept`, `mcp-host-accept`, its runtime's `mcp-gateway` workers
//! and one `mcp-<server>` per running stdio server).

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sbx_audit::{AuditLog, Entry, Identity};
use sbx_policy::{Decision, Policy, Surface};
use sbx_protocol::agent::{AGENT_PORT, EVENTS_PORT};
use sbx_protocol::cmdline::{self, Boot};
use vmm::devices::virtio::vsock::{VsockConfig, VsockHost};
use vmm::{BootTimings, Console, VmConfig, VmOutcome};

use crate::egress::Egress;
use crate::error::{fail, At, Error, Result};
use crate::files::{self, FileSupervisor};
use crate::guest::{self, ConsoleWatch};
use crate::spec::{SessionSpec, VmSpec};
use crate::state::{self, Dir, Info, Phase};
use crate::throttle::Limits;
use crate::{cgroup, confine, control, disks, host_edits, mcp, paths, sys};

/// How long an audit record may wait in the page cache before it is synced.
pub const AUDIT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The guest's vsock address (each VM has a device of its own).
const GUEST_CID: u32 = 3;

/// How the VM is used.
pub enum Front<'a> {
    /// Serves commands over vsock until stopped (the session process of
    /// `sbx start`): shares, egress, the control socket and the guest's
    /// events, in the session's directory.
    Service(Service),
    /// Runs one command on the guest console and ends with it (`sbx boot`).
    Command(OneCommand<'a>),
}

/// The session process's side of a service session.
pub struct Service {
    pub status: Status,
    pub ready: Arc<Ready>,
}

pub struct OneCommand<'a> {
    /// The command (a console shell when empty); the policy must allow it.
    pub command: Vec<String>,
    /// The kernel command line's base ([`cmdline::BASE`] unless replaced).
    pub cmdline: String,
    /// Opens the console once the policy has admitted the command (so a
    /// refusal leaves the terminal as it was).
    pub console: Box<dyn FnOnce() -> Result<Console> + 'a>,
    pub timings: BootTimings,
}

/// The pipe to `sbx start`: one line, `ok` or `error: ...`, then closed.
pub struct Ready(Mutex<Option<File>>);

impl Ready {
    /// `fd` is the pipe's write end, handed to this process for it alone.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else owns.
    pub unsafe fn from_fd(fd: Option<RawFd>) -> Ready {
        // SAFETY: the caller vouches that the descriptor is ours alone.
        Ready(Mutex::new(fd.map(|fd| unsafe { File::from_raw_fd(fd) })))
    }

    /// Says `line` if nothing was said yet.
    pub fn report(&self, line: &str) {
        if let Some(mut f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A service session's record on disk (`session.json`), kept current.
#[derive(Clone)]
pub struct Status {
    dir: Dir,
    info: Arc<Mutex<Info>>,
}

impl Status {
    /// Records `spec`'s session as starting, by this process.
    pub fn starting(dir: Dir, spec: &SessionSpec) -> Result<Status> {
        let info = Info {
            name: spec.name.clone(),
            pid: std::process::id(),
            started: sys::unix_secs(),
            vcpus: spec.vm.vcpus,
            mem_mib: spec.vm.mem_mib,
            state: Phase::Starting,
            exit: None,
        };
        dir.write_info(&info)?;
        Ok(Status {
            dir,
            info: Arc::new(Mutex::new(info)),
        })
    }

    pub(crate) fn set(&self, phase: Phase, exit: Option<String>) {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
        i.state = phase;
        i.exit = exit;
        if let Err(e) = self.dir.write_info(&i) {
            tracing::warn!("{e}");
        }
    }

    fn phase(&self) -> Phase {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    pub(crate) fn name(&self) -> &str {
        &self.dir.name
    }
}

/// Checks that this host can boot guests and that the guest kernel and
/// initramfs exist.
fn check_images(vm: &VmSpec) -> Result<()> {
    // The host first: on a host that cannot boot guests, nothing else matters.
    vmm::host::ensure_bootable(&vm.kvm)?;
    if !vm.kernel.exists() {
        fail!(
            Invalid,
            "guest kernel {} not found: build it with `cargo xtask kernel` or pass --kernel",
            vm.kernel.display()
        );
    }
    if !vm.initrd.exists() {
        fail!(
            Invalid,
            "guest initramfs {} not found: build it with `cargo xtask rootfs` or pass --initrd",
            vm.initrd.display()
        );
    }
    Ok(())
}

/// Records a decision and turns a denial into an error naming the rule.
fn admit(
    log: &AuditLog,
    surface: Surface,
    action: &str,
    resource: &str,
    d: &Decision<'_>,
) -> Result<()> {
    if log.decision(surface, action, resource, d)? {
        return Ok(());
    }
    Err(Error::Denied(sbx_audit::denial(action, resource, d)))
}

/// Opens the session's audit log, records its start and asks the policy
/// whether a VM of this size may run.
fn open_audit_log(spec: &SessionSpec, policy: &Policy) -> Result<AuditLog> {
    // The state directory too: logs name files, hosts and commands.
    for dir in [paths::state_dir(), paths::audit_dir()] {
        paths::private_dir(&dir)
            .map_err(|e| Error::Invalid(format!("cannot keep the audit log: {e}")))?;
    }
    let path = paths::audit_dir().join(format!("{}.jsonl", spec.name));
    // Signed in to a control plane, records name the person and the
    // machine as the server knows them.
    let login = crate::managed::current().ok().flatten();
    let mut identity = Identity::current(&spec.name);
    if let Some(l) = &login {
        identity.user = l.email.clone();
        identity.host = l.machine.clone();
    }
    let log = AuditLog::open(&path, identity, AUDIT_SYNC_INTERVAL)?;
    let sources: Vec<&str> = policy.sources().iter().map(|s| s.name.as_str()).collect();
    let (vcpus, mem) = (spec.vm.vcpus, spec.vm.mem_mib);
    let mut start = Entry::session_start(&spec.name, vcpus, mem, &sources);
    if let Some(l) = &login {
        start.event.details["server"] = serde_json::json!(l.url);
        start.event.details["team"] = serde_json::json!(l.team);
        start.event.details["role"] = serde_json::json!(l.role);
    }
    log.record(start)?;
    let size = format!("{vcpus} vCPUs, {mem} MiB");
    let d = policy.decide_limits(vcpus.into(), mem);
    admit(&log, Surface::Limits, "start", &size, &d)?;
    Ok(log)
}

/// The VM `spec` asks for, with `cmdline` and these devices.
fn vm_config(
    spec: &SessionSpec,
    policy: &Policy,
    boot: &Boot,
    base: &str,
    vsock: Option<VsockConfig>,
    fs: Vec<vmm::devices::virtio::fs::FsConfig>,
    block: Vec<vmm::devices::virtio::block::BlockConfig>,
) -> Result<VmConfig> {
    // TCG does not intercept a nested guest's XSETBV.
    let quirks: &[&str] = if vmm::host::nested_under_tcg() {
        &["noxsave"]
    } else {
        &[]
    };
    let cmdline = boot
        .encode(base, quirks)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    tracing::debug!(%cmdline, "booting");
    Ok(VmConfig {
        kvm_path: spec.vm.kvm.clone(),
        kernel: spec.vm.kernel.clone(),
        initrd: Some(spec.vm.initrd.clone()),
        cmdline,
        vcpus: spec.vm.vcpus,
        mem_mib: spec.vm.mem_mib,
        lifetime: policy.lifetime().map(|(d, _)| d),
        vsock,
        fs,
        block,
        pause: None,
    })
}

/// How a session's VM ended.
pub struct Ended {
    pub outcome: VmOutcome,
    /// When the policy's lifetime limit ended it: what to tell people,
    /// naming the rule.
    pub expired: Option<String>,
}

/// Runs the session `spec` describes until its VM ends.
pub fn run(spec: &SessionSpec, front: Front<'_>) -> Result<Ended> {
    check_images(&spec.vm)?;
    let policy = spec.policy.load()?;
    let log = Arc::new(open_audit_log(spec, &policy)?);
    if matches!(front, Front::Service(_)) {
        if let Some(d) = crate::privileges::dropped() {
            log.record(Entry::privileges(&d.kept, d.dropped))?;
        }
        crate::seccomp::record_to(&log)?;
    }
    let lifetime = policy.lifetime().map(|(_, rule)| {
        format!(
            "rule `{}` ({} layer, {}) limits its lifetime",
            rule.id, rule.layer, rule.location
        )
    });
    // Started by each front once the process is confined (a thread keeps
    // the confinement of the moment it starts).
    let mut shipper = None;
    let result = match front {
        Front::Command(c) => one_command(spec, &policy, &log, c, &mut shipper),
        Front::Service(s) => service(spec, policy, &log, s, &mut shipper),
    };
    let details = match &result {
        Ok(o) => serde_json::json!({
            "exit_reason": o.reason.to_string(),
            "guest_status": o.guest_status,
        }),
        Err(e) => serde_json::json!({ "exit_reason": e.to_string(), "error": e.to_string() }),
    };
    log.record(Entry::session_stop(&spec.name, details))?;
    // Helper threads may still hold the log; the process ends soon after.
    log.sync()?;
    if let Some((stop, thread)) = shipper {
        // The last records go now; what cannot goes with the next `sbx`.
        let _ = stop.send(());
        let _ = thread.map(std::thread::JoinHandle::join);
    }
    let outcome = result?;
    let expired = match (&outcome.reason, lifetime) {
        (vmm::ExitReason::LifetimeExpired(d), Some(rule)) => Some(format!(
            "the policy ended the session after {} s: {rule}",
            d.as_secs()
        )),
        _ => None,
    };
    Ok(Ended { outcome, expired })
}

/// The thread shipping a session's records, and what tells it to stop.
type Shipper = (
    std::sync::mpsc::Sender<()>,
    Option<std::thread::JoinHandle<()>>,
);

/// On a machine signed in to a control plane: every second, ships the
/// session's new records there (an exfiltration attempt must raise its
/// alert within seconds; with nothing new, nothing is sent); once more
/// when told to stop. Failures only wait: the log is the spool.
fn ship_while_running(log: &AuditLog) -> Option<Shipper> {
    crate::managed::current().ok().flatten()?;
    let log = log.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = sbx_seccomp::spawn("audit-ship", sbx_seccomp::Kind::Ship, move || loop {
        let last = !matches!(
            rx.recv_timeout(Duration::from_secs(1)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        if let Err(e) = crate::managed::ship(&log, false) {
            tracing::debug!("shipping {}: {e}", log.display());
        }
        if last {
            return;
        }
    });
    if let Err(e) = &spawned {
        tracing::warn!("cannot start the audit-ship thread: {e}");
    }
    Some((tx, spawned.ok()))
}

/// `sbx boot`: the policy must allow the command; the VM has no devices
/// beyond its console, and ends with the command.
fn one_command(
    spec: &SessionSpec,
    policy: &Policy,
    log: &AuditLog,
    c: OneCommand<'_>,
    shipper: &mut Option<Shipper>,
) -> Result<VmOutcome> {
    let argv0 = c.command.first().map_or("/bin/sh", String::as_str);
    admit(
        log,
        Surface::Exec,
        "exec",
        argv0,
        &policy.decide_exec(argv0),
    )?;
    // `sbx boot` has no guest-facing parts to confine itself for.
    *shipper = ship_while_running(log);
    let boot = Boot {
        command: (!c.command.is_empty()).then(|| c.command.clone()),
        ..Boot::default()
    };
    let config = vm_config(
        spec,
        policy,
        &boot,
        &c.cmdline,
        None,
        Vec::new(),
        Vec::new(),
    )?;
    let console = (c.console)()?;
    Ok(vmm::run(&config, console, c.timings)?)
}

/// A service session: shares, egress, events and control around the VM.
fn service(
    spec: &SessionSpec,
    mut policy: Policy,
    log: &Arc<AuditLog>,
    s: Service,
    shipper: &mut Option<Shipper>,
) -> Result<VmOutcome> {
    let dir = s.status.dir.clone();
    // Shares: the spec's, granted by the policy, and the policy's own.
    files::grant(&mut policy, &spec.mounts, log)?;
    let policy = Arc::new(policy);
    let host = VsockHost::new().at(|| "cannot set up the vsock device".into())?;
    let edits = host_edits::start(host.clone()).at(|| "cannot start host edits".into())?;
    // What the guest can make the host record, bounded (see `throttle`).
    let limits = Limits::new();
    limits
        .start_reporting(log.clone())
        .at(|| "cannot start the dropped-records thread".into())?;
    let supervisor = FileSupervisor::new(policy.clone(), log.clone(), edits, limits.clone())?;
    let (fs, shares) = files::devices(
        &policy,
        log,
        spec.fs_cache,
        spec.share_quota,
        supervisor.clone(),
    )?;

    // The root from an image: its disk and the session's writable layer.
    let layer = spec.root.as_ref().map(|r| disks::layer_size(r, &policy));
    let (block, root) = match (&spec.root, layer) {
        (Some(r), Some(size)) => {
            let asked = format!("a {} MiB disk", size >> 20);
            admit(
                log,
                Surface::Limits,
                "disk",
                &asked,
                &policy.decide_disk(size >> 20),
            )?;
            let (disks, root) = disks::devices(&spec.name, r, size)?;
            (disks, Some(root))
        }
        _ => (Vec::new(), None),
    };
    // The session's memory, now that its shares and disks are known, and
    // before the guest can use any.
    let written = crate::memory::session_files(spec, &dir, &fs, layer);
    cgroup::limit_memory(crate::memory::budget(spec.vm.mem_mib << 20, &written));
    cgroup::record(log)?;

    // The MCP servers' helper starts VMs, which the confined session
    // process cannot: it starts first.
    let helper = if spec.mcp.is_empty() {
        None
    } else {
        Some(mcp::Helper::spawn(&spec.name)?)
    };

    // From here on the guest can reach the session: confine it first.
    confine(spec, &dir, &fs, &block, log)?;
    // Threads started from here on inherit the restriction from it.
    sbx_seccomp::start_spawner().map_err(|e| Error::Session(e.to_string()))?;
    *shipper = ship_while_running(log);

    // Egress: the proxy on its vsock port; the guest gets its CA.
    let egress = Egress::start(&spec.name, &spec.egress, policy.clone(), log.clone(), &host)?;
    // The MCP gateway on its vsock port, and `mcp.sock` for `sbx mcp`.
    let _gateway = match helper {
        Some(helper) => Some(mcp::start(
            spec,
            &dir,
            policy.clone(),
            log.clone(),
            &host,
            helper,
            egress.secrets().to_vec(),
        )?),
        None => None,
    };
    let boot = Boot {
        session: true,
        shares,
        workdir: spec.workdir().map(str::to_string),
        root,
        egress_ca: Some(egress.ca_body()),
        mcp: !spec.mcp.is_empty(),
        command: None,
    };
    let mut env: Vec<(String, String)> = spec
        .root
        .iter()
        .flat_map(|r| &r.env)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(spec.env.iter().cloned());
    env.extend(egress.guest_env());

    // The guest's reports: its first `agent_ready` makes the session running.
    {
        let (events, log, status, ready) = (
            host.listen(EVENTS_PORT),
            log.clone(),
            s.status.clone(),
            s.ready.clone(),
        );
        let on_ready = Arc::new(move || {
            status.set(Phase::Running, None);
            // Only the first report reaches `sbx start`.
            ready.report("ok");
        });
        let (name, limits) = (spec.name.clone(), limits.clone());
        // Each connection's thread is started from it, under its filter.
        sbx_seccomp::spawn("events-accept", sbx_seccomp::Kind::Events, move || {
            guest::serve_events(events, log, name, limits, on_ready)
        })
        .at(|| "cannot start the events thread".into())?;
    }
    let _ = std::fs::remove_file(dir.ctl_path());
    let ctl = UnixListener::bind(dir.ctl_path())
        .at(|| format!("cannot listen on {}", dir.ctl_path().display()))?;
    let defaults = control::ExecDefaults {
        env,
        user: spec.user.clone(),
    };
    let pause = control::PauseControl {
        switch: Arc::new(
            vmm::PauseSwitch::new().at(|| "cannot make the VM's pause switch".into())?,
        ),
        status: s.status.clone(),
    };
    let switch = pause.switch.clone();
    control::serve(
        ctl,
        policy.clone(),
        log.clone(),
        host.clone(),
        defaults,
        pause,
    )?;

    let vsock = VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: Some(dir.vsock_path()),
        reserved_ports: vec![AGENT_PORT],
        host,
    };
    let mut config = vm_config(spec, &policy, &boot, cmdline::BASE, Some(vsock), fs, block)?;
    config.pause = Some(switch);
    let file = File::create(dir.console_path())
        .at(|| format!("cannot create {}", dir.console_path().display()))?;
    let console = Console {
        output: Box::new(ConsoleWatch::new(file, log.clone(), limits.clone())),
        input: None,
    };
    let result = vmm::run(
        &config,
        console,
        BootTimings::new(std::time::Instant::now()),
    );

    let ended = match &result {
        Ok(o) => o.reason.to_string(),
        Err(e) => e.to_string(),
    };
    let was_ready = s.status.phase() == Phase::Running;
    s.status.set(Phase::Stopped, Some(ended.clone()));
    let _ = std::fs::remove_file(dir.ctl_path());
    let _ = std::fs::remove_file(dir.mcp_path());
    supervisor.flush();
    limits.report(log);
    let outcome = result?;
    if !was_ready {
        fail!(
            Session,
            "the VM stopped before the guest agent was ready ({ended}); the guest console is in {}",
            dir.console_path().display()
        );
    }
    Ok(outcome)
}

/// Confines the session process to what it needs from here on (see
/// [`confine`](crate::confine)) and records to what, and how far the kernel
/// enforces it. `SBX_CONFINE_PROBE=PATH` (for tests) has it try to read
/// PATH afterwards and record whether it could.
fn confine(
    spec: &SessionSpec,
    dir: &Dir,
    shares: &[vmm::devices::virtio::fs::FsConfig],
    disks: &[vmm::devices::virtio::block::BlockConfig],
    log: &AuditLog,
) -> Result<()> {
    let mut allowed = confine::Allowed::default();
    allowed
        .read
        .extend(confine::SYSTEM.iter().map(PathBuf::from));
    allowed.read.extend([
        spec.vm.kernel.clone(),
        spec.vm.initrd.clone(),
        PathBuf::from("/dev/null"),
        PathBuf::from("/dev/urandom"),
        // The secret store, read as egress starts.
        paths::config_dir(),
        paths::state_dir().join("secrets"),
    ]);
    allowed.read.extend(spec.egress.upstream_ca.iter().cloned());
    let (mcp_read, mcp_write) = mcp::confined_paths(spec);
    allowed.read.extend(mcp_read);
    allowed.read_write.extend(mcp_write);
    allowed
        .read_write
        .extend([spec.vm.kvm.clone(), dir.path.clone(), paths::audit_dir()]);
    for s in shares {
        let list = if s.read_only {
            &mut allowed.read
        } else {
            &mut allowed.read_write
        };
        list.push(s.host_dir.clone());
    }
    for d in disks {
        let list = if d.read_only {
            &mut allowed.read
        } else {
            &mut allowed.read_write
        };
        list.push(d.path.clone());
    }
    let how = confine::restrict(&allowed)?;
    let mut details = serde_json::json!({
        "landlock_abi": confine::abi(),
        "read": allowed.read,
        "read_write": allowed.read_write,
    });
    if let Some(probe) = std::env::var_os("SBX_CONFINE_PROBE") {
        let probe = PathBuf::from(probe);
        let outcome = match confine::can_read(&probe) {
            Ok(()) => "readable".to_string(),
            Err(e) => e.to_string(),
        };
        details["probe"] = serde_json::json!({ "path": probe, "outcome": outcome });
    }
    log.record(Entry::confined(how.as_str(), details))?;
    Ok(())
}

/// The session process (`sbx __session NAME`): serves session `name` from
/// the spec in its directory for as long as its VM runs, and tells `ready`
/// how the start went.
pub fn serve(name: &str, ready: Ready) -> Result<()> {
    // Every thread inherits this mask, so SIGINT, SIGTERM and SIGHUP reach
    // the VMM's signalfd (a graceful VM stop) and never kill a helper thread.
    sys::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    // A client that goes away mid-write is that connection's problem, not
    // the session's: writes to it fail with EPIPE instead of killing us.
    // SAFETY: sets a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    sys::set_fd_limit();
    let ready = Arc::new(ready);
    let result = (|| {
        let dir = Dir::new(name)?;
        let _lock = state::hold_lock(&dir.lock_path())?;
        let spec = SessionSpec::read(&dir.spec_path())?;
        let status = Status::starting(dir, &spec)?;
        // All before the first thread starts: the process moves whole, but
        // threads copy their parent's capabilities and filters.
        cgroup::place_session(&spec);
        crate::privileges::drop_privileges()?;
        crate::seccomp::enable(&spec, &status)?;
        let service = Service {
            status,
            ready: ready.clone(),
        };
        run(&spec, Front::Service(service)).map(|_| ())
    })();
    if let Err(e) = &result {
        ready.report(&format!("error: {e}"));
    }
    result
}
