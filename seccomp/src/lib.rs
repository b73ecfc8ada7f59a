//! seccomp filters for the session process: one per kind of thread, each
//! allowing only what that thread calls (`filters`), installed by the
//! thread itself before it touches anything the guest sends.
//!
//! A session enables them once ([`enable`]); until then [`enter`] and
//! [`spawn`] do nothing special, so the crates that run session threads
//! also work unconfined elsewhere (the server, tests, `sbx` itself).
//!
//! Filters stack, so a thread started by a confined thread keeps its
//! parent's filter under its own. Every session thread is therefore started
//! by one spawner thread ([`spawn`]) whose filter allows what any kind may.
//!
//! A call outside a thread's list traps (`trap`): the thread stops there,
//! and a reporter thread records which thread made which call and ends the
//! session.

mod filters;
mod spawn;
mod trap;

use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use spawn::{spawn, start_spawner};
pub use trap::{unblock_signal, Violation};

/// The kinds of thread in a session process, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Runs guest code (KVM_RUN).
    Vcpu,
    /// The VMM's event loop, which is the process's main thread.
    EventLoop,
    /// The vsock device's worker.
    Vsock,
    /// A virtio-fs share's worker: the passthrough.
    Fs,
    /// A share's watch on host edits.
    FsWatch,
    /// A disk's worker.
    Block,
    /// The entropy device's worker.
    Rng,
    /// The guest agent's reports.
    Events,
    /// The control socket: `sbx exec` requests.
    Control,
    /// Passing host edits to the guest agent.
    HostEdits,
    /// The egress proxy.
    Egress,
    /// The MCP gateway and its servers' clients.
    Mcp,
    /// The audit log's helpers: syncing, counting dropped records, file
    /// change summaries.
    Audit,
    /// Shipping the audit log to the control plane.
    Ship,
    /// Reports a violation and ends the process.
    Report,
    /// Starts every other thread.
    Spawn,
}

impl Kind {
    pub const ALL: [Kind; 16] = [
        Kind::Vcpu,
        Kind::EventLoop,
        Kind::Vsock,
        Kind::Fs,
        Kind::FsWatch,
        Kind::Block,
        Kind::Rng,
        Kind::Events,
        Kind::Control,
        Kind::HostEdits,
        Kind::Egress,
        Kind::Mcp,
        Kind::Audit,
        Kind::Ship,
        Kind::Report,
        Kind::Spawn,
    ];

    /// The name records and messages use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vcpu",
            Kind::EventLoop => "event-loop",
            Kind::Vsock => "vsock",
            Kind::Fs => "fs",
            Kind::FsWatch => "fs-watch",
            Kind::Block => "block",
            Kind::Rng => "rng",
            Kind::Events => "events",
            Kind::Control => "control",
            Kind::HostEdits => "host-edits",
            Kind::Egress => "egress",
            Kind::Mcp => "mcp",
            Kind::Audit => "audit",
            Kind::Ship => "ship",
            Kind::Report => "report",
            Kind::Spawn => "spawn",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> u8 {
        Kind::ALL
            .iter()
            .position(|&k| k == self)
            .expect("every kind is in ALL") as u8
    }
}

/// What a call outside a thread's list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The thread stops, the violation is recorded and the session ends.
    Enforce,
    /// The call goes through and the kernel logs it (`audit: type=1326`
    /// in the kernel log): for finding what a new code path calls.
    Log,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter for {kind} threads: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter for a {kind} thread: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot set up seccomp violation reports: {0}")]
    Trap(std::io::Error),
    #[error("cannot start the seccomp {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("seccomp filters are already enabled in this process")]
    Again,
}

struct Enabled {
    mode: Mode,
    programs: HashMap<Kind, BpfProgram>,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// Builds every kind's filter. Enforcing, a call outside the list traps;
/// the reporter, which the trap relies on, is killed outright instead.
/// (Not the spawner: every thread it starts keeps its filter under its
/// own, and of two filters' answers the kernel takes the harsher.)
fn compile(mode: Mode) -> Result<HashMap<Kind, BpfProgram>, Error> {
    let mut programs = HashMap::new();
    for kind in Kind::ALL {
        let mismatch = match (mode, kind) {
            (Mode::Log, _) => SeccompAction::Log,
            (Mode::Enforce, Kind::Report) => SeccompAction::KillProcess,
            (Mode::Enforce, _) => SeccompAction::Trap,
        };
        let build = |source| Error::Build {
            kind: kind.name(),
            source,
        };
        let filter = SeccompFilter::new(
            filters::rules(kind),
            mismatch,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(build)?;
        programs.insert(kind, BpfProgram::try_from(filter).map_err(build)?);
    }
    Ok(programs)
}

/// Turns filters on for this process: from now on [`enter`] installs them,
/// and [`spawn`] starts threads that do (through the spawner once
/// [`start_spawner`] has started it). `on_violation` runs on
/// the reporter thread when a thread traps; the process ends right after
/// it (or 5 s into it, if it hangs).
pub fn enable(
    mode: Mode,
    on_violation: impl FnOnce(&Violation) + Send + 'static,
) -> Result<(), Error> {
    let programs = compile(mode)?;
    // Set first: the reporter and the spawner enter their own filters.
    ENABLED
        .set(Enabled { mode, programs })
        .map_err(|_| Error::Again)?;
    if mode == Mode::Enforce {
        trap::start(on_violation)?;
    }
    tracing::debug!("seccomp filters enabled ({mode:?})");
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    mode().is_some()
}

/// The mode [`enable`] was called with.
pub fn mode() -> Option<Mode> {
    ENABLED.get().map(|e| e.mode)
}

/// Confines the calling thread to `kind`'s filter, for the rest of its
/// life; nothing unless filters are enabled.
pub fn enter(kind: Kind) -> Result<(), Error> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    // A thread started with every signal blocked would have a trap turned
    // into a plain kill, with nothing recorded.
    unblock_signal(libc::SIGSYS);
    trap::set_kind(kind);
    let program = &enabled.programs[&kind];
    seccompiler::apply_filter(program).map_err(|source| Error::Install {
        kind: kind.name(),
        source,
    })?;
    if enabled.mode == Mode::Enforce {
        probe(kind);
    }
    Ok(())
}

/// The environment variable that makes the threads of a kind, or the
/// threads of a name, call a syscall outside their list right after their
/// filter is installed (tests: each kind must stop the session with a
/// record naming the call).
pub const PROBE_ENV: &str = "SBX_TEST_SECCOMP_PROBE";

/// The call the probe makes: `personality(0xffffffff)` only reads the
/// current persona, and no thread kind allows it.
pub const PROBE_SYSCALL: &str = "personality";

fn probe(kind: Kind) {
    let Ok(asked) = std::env::var(PROBE_ENV) else {
        return;
    };
    if asked == kind.name() || std::thread::current().name() == Some(asked.as_str()) {
        // SAFETY: personality with 0xffffffff changes nothing and touches
        // no memory; it only returns the current persona.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    }
}

/// Whether this kernel can run the filters: seccomp filters with the trap
/// action (what `sbx doctor` reports).
pub fn available() -> Result<(), String> {
    const ACTIONS: &str = "/proc/sys/kernel/seccomp/actions_avail";
    match std::fs::read_to_string(ACTIONS) {
        Ok(a) if a.split_whitespace().any(|w| w == "trap") => Ok(()),
        Ok(a) => Err(format!(
            "this kernel's seccomp has no trap action ({ACTIONS}: {})",
            a.trim()
        )),
        Err(e) => Err(format!(
            "this kernel has no seccomp filters ({ACTIONS}: {e})"
        )),
    }
}

/// The seccomp mode of each of this process's threads, by thread name, as
/// `/proc` shows it (0 none, 1 strict, 2 filter).
pub fn thread_modes(pid: u32) -> std::io::Result<Vec<(String, u8)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let name = field("Name:").unwrap_or_default();
        let mode = field("Seccomp:").and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push((name, mode));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
