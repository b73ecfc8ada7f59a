//! A session on disk: `<runtime dir>/<name>/` holds `spec.json` (what
//! the session is), `session.json` (how it is doing), a `lock` the session
//! process holds for as long as it lives, its control socket, the hybrid
//! vsock socket and the guest console log.
//!
//! Whether a session is alive is read from the lock, not from a PID, so a
//! killed session is seen as dead even after its PID is reused.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{fail, At, Result};
use crate::paths;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub pid: u32,
    /// Seconds since the epoch.
    pub started: u64,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub state: Phase,
    /// Why the VM stopped, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    /// Its vCPUs stopped by `sbx pause`; memory and devices kept.
    Paused,
    Stopped,
    /// The session process is gone without having recorded a stop.
    Dead,
}

impl Phase {
    /// Whether its session process is (or should be) alive.
    pub fn is_alive(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running | Phase::Paused)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Stopped => "stopped",
            Phase::Dead => "dead",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Dir {
    pub name: String,
    pub path: PathBuf,
}

/// Session names end up in paths and socket names: keep them plain.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        fail!(Invalid, "invalid session name {name:?}: use 1 to 48 letters, digits, '-', '_' or '.', not starting with '.'");
    }
    Ok(())
}

impl Dir {
    pub fn new(name: &str) -> Result<Dir> {
        check_name(name)?;
        Ok(Dir {
            name: name.to_string(),
            path: paths::runtime_dir().join(name),
        })
    }

    pub fn spec_path(&self) -> PathBuf {
        self.path.join("spec.json")
    }
    pub fn info_path(&self) -> PathBuf {
        self.path.join("session.json")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.path.join("lock")
    }
    pub fn ctl_path(&self) -> PathBuf {
        self.path.join("ctl.sock")
    }
    /// The MCP gateway's socket for `sbx mcp`.
    pub fn mcp_path(&self) -> PathBuf {
        self.path.join("mcp.sock")
    }
    pub fn vsock_path(&self) -> PathBuf {
        self.path.join("vsock.sock")
    }
    pub fn console_path(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn log_path(&self) -> PathBuf {
        self.path.join("sbx.log")
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    pub fn read_info(&self) -> Result<Info> {
        read_json(&self.info_path(), "a session record")
    }

    /// Replaces `session.json` atomically (write, then rename).
    pub fn write_info(&self, info: &Info) -> Result<()> {
        write_json(&self.info_path(), info)
    }

    /// True while the session process holds its lock.
    pub fn alive(&self) -> bool {
        let Ok(f) = File::open(self.lock_path()) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; released when `f` closes.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        rc != 0
    }

    /// The recorded state, corrected by the lock: a session whose process
    /// is gone without recording a stop is dead.
    pub fn status(&self) -> Result<Info> {
        let mut info = self.read_info()?;
        if info.state.is_alive() && !self.alive() {
            info.state = Phase::Dead;
        }
        Ok(info)
    }

    /// The state of a session that must exist: an unknown name is an error
    /// that says how to list sessions.
    pub fn existing(name: &str) -> Result<(Dir, Info)> {
        let dir = Dir::new(name)?;
        if !dir.exists() {
            fail!(
                Session,
                "no session named `{name}`; `sbx ls` lists sessions"
            );
        }
        let info = dir.status()?;
        Ok((dir, info))
    }

    /// A session that must be running.
    pub fn running(name: &str) -> Result<Dir> {
        let (dir, info) = Dir::existing(name)?;
        match info.state {
            Phase::Running => Ok(dir),
            Phase::Starting => fail!(Session, "session `{name}` is still starting; try again in a moment"),
            Phase::Paused => fail!(Session, "session `{name}` is paused; `sbx resume {name}` first"),
            state => fail!(
                Session,
                "session `{name}` is not running (it is {state}); `sbx start --name {name}` starts it again, `sbx rm {name}` removes it"
            ),
        }
    }
}

/// Reads a JSON document sbx wrote, naming the file and what it should be.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).at(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(v) => Ok(v),
        Err(e) => fail!(Session, "{} is not {what}: {e}", path.display()),
    }
}

/// Replaces `path` atomically (write beside it, then rename).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(value).expect("sbx's own records serialise");
    std::fs::write(&tmp, bytes).at(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).at(|| format!("cannot write {}", path.display()))
}

/// Takes the session lock for the session process's lifetime.
pub fn hold_lock(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .at(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        fail!(Session, "another process holds {}", path.display());
    }
    Ok(f)
}

/// Every session directory, sorted by name.
pub fn all() -> Vec<Dir> {
    let mut out: Vec<Dir> = std::fs::read_dir(paths::runtime_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("session.json").exists())
        .filter_map(|e| Dir::new(&e.file_name().to_string_lossy()).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for ok in ["s1", "my-agent_2", "a.b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(49)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn liveness_comes_from_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir {
            name: "t".into(),
            path: tmp.path().to_path_buf(),
        };
        let info = Info {
            name: "t".into(),
            pid: 1,
            started: 0,
            vcpus: 1,
            mem_mib: 256,
            state: Phase::Running,
            exit: None,
        };
        dir.write_info(&info).unwrap();
        assert_eq!(dir.status().unwrap().state, Phase::Dead);
        let lock = hold_lock(&dir.lock_path()).unwrap();
        assert!(dir.alive());
        assert_eq!(dir.status().unwrap().state, Phase::Running);
        assert!(hold_lock(&dir.lock_path()).is_err());
        drop(lock);
        assert!(!dir.alive());
    }
}
