//! A cgroup (v2) per session, where the host lets sbx make one: the
//! session process moves itself into `sbx/NAME` under the cgroup2 root
//! before its first thread starts, with CPU for its vCPUs plus one for the
//! VMM's own threads and a bound on threads, and its memory accounted.
//!
//! Memory is not limited yet: a cgroup's memory counts the host pages of
//! the files its process writes, and where the session's disk or shares
//! sit on tmpfs those cannot be reclaimed, so a limit of guest RAM plus an
//! allowance killed a guest filling its 300 MiB disk (the OOM killer, in
//! the nested test host, whose /tmp is RAM). `MEMORY_NOTE` says so.
//!
//! Where the host does not delegate (no cgroup2, its controllers not
//! available, or no write access to the hierarchy), the session runs
//! without and says so in its audit log.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sbx_audit::{AuditLog, Entry};

use crate::spec::SessionSpec;

/// Why the cgroup does not limit memory (see the module).
pub const MEMORY_NOTE: &str = "not limited: the cgroup would count the host pages of files the guest writes, which on tmpfs cannot be reclaimed";
/// Threads and processes: the session's fixed threads, two per egress
/// connection (at most 256), exec requests, and the MCP gateway's.
pub const PIDS_MAX: u64 = 2048;
/// The scheduler period cpu.max is written in, in µs.
const PERIOD_US: u64 = 100_000;
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The limits of one session's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `cpu.max`: quota and period, in µs.
    pub cpu_max: (u64, u64),
    pub pids_max: u64,
}

impl Limits {
    pub fn for_vm(vcpus: u32) -> Limits {
        Limits {
            cpu_max: ((u64::from(vcpus) + 1) * PERIOD_US, PERIOD_US),
            pids_max: PIDS_MAX,
        }
    }
}

/// Where a session ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Placed {
        path: PathBuf,
        limits: Limits,
    },
    /// Why not, and what would make it work.
    NotDelegated(String),
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPER"
        let (left, right) = l.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

/// Enables `CONTROLLERS` for the children of `dir`.
fn delegate(dir: &Path) -> Result<(), String> {
    let have = std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            dir.join("cgroup.controllers").display()
        )
    })?;
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !have.split_whitespace().any(|h| h == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the {} controller(s) are not available in {}",
            missing.join(", "),
            dir.display()
        ));
    }
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    write(&dir.join("cgroup.subtree_control"), &enable.join(" "))
}

/// Removes the cgroups of sessions that have ended (an empty cgroup can be
/// removed; one with processes cannot, so this never touches a live one).
/// One made in the last minute may belong to a session still moving in.
fn sweep(parent: &Path) {
    let recent = |e: &std::fs::DirEntry| {
        e.metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age.as_secs() < 60)
    };
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) && !recent(&entry) {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Moves this process into a cgroup of its own for session `name`, with
/// `limits`. Call before the process starts any thread: a process moves
/// as a whole, but the move is simplest before threads exist.
pub fn place(name: &str, limits: &Limits) -> Placement {
    match try_place(name, limits) {
        Ok(path) => Placement::Placed {
            path,
            limits: limits.clone(),
        },
        Err(why) => Placement::NotDelegated(why),
    }
}

fn try_place(name: &str, limits: &Limits) -> Result<PathBuf, String> {
    let root = cgroup2_root().ok_or("no cgroup2 file system is mounted")?;
    delegate(&root)?;
    let parent = root.join("sbx");
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", parent.display())),
    }
    delegate(&parent)?;
    sweep(&parent);
    let dir = parent.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let (quota, period) = limits.cpu_max;
    write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
    write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
    write(&dir.join("cgroup.procs"), "0")?;
    Ok(dir)
}

static PLACED: OnceLock<Placement> = OnceLock::new();

/// Places this session process (see [`place`]) by its spec's VM size.
pub fn place_session(spec: &SessionSpec) {
    let limits = Limits::for_vm(spec.vm.vcpus);
    let placed = place(&spec.name, &limits);
    if let Placement::NotDelegated(why) = &placed {
        tracing::info!("no cgroup of its own for session {}: {why}", spec.name);
    }
    let _ = PLACED.set(placed);
}

/// Records where [`place_session`] put the process, and with what limits.
pub fn record(log: &AuditLog) -> crate::error::Result<()> {
    let entry = match PLACED.get() {
        None => return Ok(()),
        Some(Placement::Placed { path, limits }) => Entry::cgroup(
            &path.display().to_string(),
            serde_json::json!({
                "memory": MEMORY_NOTE,
                "cpu_max": format!("{} {}", limits.cpu_max.0, limits.cpu_max.1),
                "pids_max": limits.pids_max,
            }),
        ),
        Some(Placement::NotDelegated(why)) => Entry::cgroup(
            "none",
            serde_json::json!({
                "reason": why,
                "fix": "run sbx as root on a host with cgroup2 and the memory, cpu and pids controllers",
            }),
        ),
    };
    log.record(entry)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(2);
        assert_eq!(l.cpu_max, (300_000, 100_000));
        assert_eq!(l.pids_max, 2048);
    }
}
