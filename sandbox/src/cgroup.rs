//! A cgroup (v2) per session, where the host lets sbx make one: the
//! session process moves itself into `sbx/NAME` under the cgroup2 root
//! before its first thread starts, with CPU for its vCPUs plus one for the
//! VMM's own threads and a bound on threads, and its memory limited to
//! what [`crate::memory`] budgets (set once the session knows its shares
//! and disks, before the guest runs).
//!
//! Root makes `sbx/` under the cgroup2 root. Another user makes it under
//! the cgroup the host delegated to them: the highest ancestor of their
//! own cgroup that they own (systemd's `user@UID.service`), as systemd
//! delegation works.
//!
//! Where the host does not delegate (no cgroup2, its controllers not
//! available, or no cgroup of this user's), the session runs without and
//! says so in its audit log.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sbx_audit::{AuditLog, Entry};

use crate::memory::Memory;
use crate::spec::SessionSpec;

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

/// This process's cgroup, as a path under `root`, from `/proc/self/cgroup`.
fn own_cgroup(root: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup2 cgroup")?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Where this user may make cgroups: the root for root; otherwise the
/// highest ancestor of `own` (below `root`) that `uid` owns.
fn base_for(root: &Path, own: &Path, uid: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return Ok(root.to_path_buf());
    }
    own.ancestors()
        .take_while(|d| *d != root && d.starts_with(root))
        .filter(|d| std::fs::metadata(d).is_ok_and(|m| m.uid() == uid))
        .last()
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "no cgroup is delegated to uid {uid} (none of {} and its parents is theirs)",
                own.display()
            )
        })
}

fn try_place(name: &str, limits: &Limits) -> Result<PathBuf, String> {
    let root = cgroup2_root().ok_or("no cgroup2 file system is mounted")?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let base = base_for(&root, &own_cgroup(&root)?, uid)?;
    delegate(&base)?;
    let parent = base.join("sbx");
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
static MEMORY: OnceLock<Memory> = OnceLock::new();

/// Places this session process (see [`place`]) by its spec's VM size.
pub fn place_session(spec: &SessionSpec) {
    let limits = Limits::for_vm(spec.vm.vcpus);
    let placed = place(&spec.name, &limits);
    if let Placement::NotDelegated(why) = &placed {
        tracing::info!("no cgroup of its own for session {}: {why}", spec.name);
    }
    let _ = PLACED.set(placed);
}

/// Limits the memory of the cgroup [`place_session`] made to `memory`'s
/// budget. Before the guest runs: past the limit the kernel kills.
pub fn limit_memory(memory: Memory) {
    let memory = match (PLACED.get(), memory.max()) {
        (Some(Placement::Placed { path, .. }), Some(max)) => {
            match write(&path.join("memory.max"), &max.to_string()) {
                Ok(()) => memory,
                Err(e) => Memory::Unlimited(e),
            }
        }
        _ => memory,
    };
    let _ = MEMORY.set(memory);
}

/// Records where [`place_session`] put the process, and with what limits.
pub fn record(log: &AuditLog) -> crate::error::Result<()> {
    let memory = MEMORY
        .get()
        .map_or(serde_json::Value::Null, Memory::to_json);
    let entry = match PLACED.get() {
        None => return Ok(()),
        Some(Placement::Placed { path, limits }) => Entry::cgroup(
            &path.display().to_string(),
            serde_json::json!({
                "memory": memory,
                "cpu_max": format!("{} {}", limits.cpu_max.0, limits.cpu_max.1),
                "pids_max": limits.pids_max,
            }),
        ),
        Some(Placement::NotDelegated(why)) => Entry::cgroup(
            "none",
            serde_json::json!({
                "reason": why,
                "fix": "run sbx as root, or as a user with a delegated cgroup (systemd's user@UID.service, or `systemd-run --user --scope sbx ...`), on a host with cgroup2 and the memory, cpu and pids controllers",
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
    fn a_user_makes_cgroups_under_the_highest_one_they_own() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = root.join("user.slice/user@1.service/app.slice/term.scope");
        std::fs::create_dir_all(&own).unwrap();
        // As systemd delegates: user@1.service and below are the user's.
        let me = std::fs::metadata(root).unwrap().uid();
        let user = if me == 0 { 4242 } else { me };
        if me == 0 {
            for d in own
                .ancestors()
                .take_while(|d| *d != root.join("user.slice"))
            {
                std::os::unix::fs::chown(d, Some(user), None).unwrap();
            }
            std::os::unix::fs::chown(root.join("user.slice"), Some(0), None).unwrap();
        }
        assert_eq!(base_for(root, &own, 0).unwrap(), root);
        let expected = if me == 0 {
            root.join("user.slice/user@1.service")
        } else {
            root.join("user.slice")
        };
        assert_eq!(base_for(root, &own, user).unwrap(), expected);
        let err = base_for(root, &own, user + 1).unwrap_err();
        assert!(err.contains("no cgroup is delegated"), "{err}");
    }

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(2);
        assert_eq!(l.cpu_max, (300_000, 100_000));
        assert_eq!(l.pids_max, 2048);
    }
}
