//! What the session process may touch on the host's file systems once its
//! guest-facing parts start (the VMM's devices, the egress proxy, the
//! control socket): Landlock, as far as the running kernel supports it. A
//! bug in a device parser then reaches only the session's own state, its
//! audit log, its shares and what it reads to run, not the user's files.

use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use crate::error::{Error, Result};

/// The newest Landlock ABI this crate asks for; older kernels enforce what
/// they know (best effort).
const TARGET: ABI = ABI::V5;

/// What the session may still reach.
#[derive(Debug, Default)]
pub struct Allowed {
    pub read: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
}

/// The system directories a running session reads: shared libraries and
/// name resolution (`/etc`, `/usr`, `/lib*`), the TLS trust store, and
/// `/proc` and `/sys` (the VMM's host probe, the passthrough's descriptor
/// table).
pub const SYSTEM: [&str; 6] = ["/etc", "/usr", "/lib", "/lib64", "/proc", "/sys"];

/// How the restriction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// Every requested restriction is in force.
    Full,
    /// Those the kernel's Landlock ABI knows are in force.
    Partial,
    /// The kernel has no Landlock (or it is disabled at boot).
    None,
}

impl Confinement {
    pub fn as_str(self) -> &'static str {
        match self {
            Confinement::Full => "full",
            Confinement::Partial => "partial",
            Confinement::None => "none",
        }
    }
}

/// Restricts this thread, and every thread it starts from now on, to
/// `allowed`. Threads started before keep what they had, so this comes
/// before the guest-facing ones start.
pub fn restrict(allowed: &Allowed) -> Result<Confinement> {
    let fail = |e: landlock::RulesetError| {
        Error::Session(format!(
            "cannot confine the session process with Landlock: {e}"
        ))
    };
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            &allowed.read,
            AccessFs::from_read(TARGET),
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            &allowed.read_write,
            AccessFs::from_all(TARGET),
        ))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confinement::Full,
        RulesetStatus::PartiallyEnforced => Confinement::Partial,
        RulesetStatus::NotEnforced => Confinement::None,
    })
}

/// The Landlock ABI level of the running kernel; None without Landlock.
pub fn abi() -> Option<u32> {
    // SAFETY: with a null attribute, zero size and the version flag, the
    // call only returns a number; it reads and writes no memory of ours.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    u32::try_from(v).ok().filter(|&v| v > 0)
}

/// For tests: whether this process can still open `path` for reading.
pub fn can_read(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path).map(drop)
}
