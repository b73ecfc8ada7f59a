//! How much host memory a session may hold: its cgroup's `memory.max`.
//!
//! A cgroup is charged for the pages of the files its processes write,
//! and where those files sit in memory (tmpfs, ramfs, or an overlay, whose
//! upper layer may be either) the kernel cannot reclaim them: at the limit
//! it kills the session instead. So the budget is the guest's RAM, a fixed
//! allowance for the VMM, and the most the session can write into files
//! kept in memory: its writable layer, its shares up to the share quota,
//! its console log up to its cap. A file in memory that grows without
//! such a bound (a writable share with no quota, the audit log while the
//! session lives) would make any limit a time bomb: then memory is not
//! limited, and the audit record says which file and what would bound it.
//! Files on disks cost nothing here: their pages are reclaimed.

use std::path::{Path, PathBuf};

use serde::Serialize;
use vmm::devices::virtio::fs::FsConfig;

use crate::guest::CONSOLE_LOG_MAX;
use crate::spec::SessionSpec;
use crate::state::Dir;
use crate::{disks, paths};

/// What the session process may hold besides guest RAM and its files:
/// its binary, heap and kernel buffers, including everything a guest can
/// make it keep, each under its own cap (vsock buffers 64 MiB, the shares'
/// inode tables, egress connections), and the MCP servers' helper.
pub const VMM_ALLOWANCE: u64 = 256 << 20;

/// Files the session writes, in one or more places under one bound.
pub struct Written {
    /// What they are, for the audit record.
    pub what: String,
    /// Files or directories of files; the bound counts once if any of
    /// them is in memory (a share quota bounds all shares together).
    pub paths: Vec<PathBuf>,
    pub bound: Bound,
}

/// How much files can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Bytes(u64),
    /// They grow as long as the session runs; what would bound them.
    None(&'static str),
}

/// One part of a limited budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    pub what: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memory {
    /// `memory.max`: the sum of the parts.
    Limited(Vec<Part>),
    /// Why not, and what would make it work.
    Unlimited(String),
}

impl Memory {
    pub fn max(&self) -> Option<u64> {
        match self {
            Memory::Limited(parts) => Some(parts.iter().map(|p| p.bytes).sum()),
            Memory::Unlimited(_) => None,
        }
    }

    /// For the cgroup's audit record.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Memory::Limited(parts) => serde_json::json!({
                "max": self.max(),
                "parts": parts,
            }),
            Memory::Unlimited(why) => serde_json::json!(format!("not limited: {why}")),
        }
    }
}

/// What session `spec` writes: into its shares (`fs`), its writable layer
/// of `layer` bytes if it has one, its console log in `dir`, and its audit
/// log.
pub fn session_files(
    spec: &SessionSpec,
    dir: &Dir,
    fs: &[FsConfig],
    layer: Option<u64>,
) -> Vec<Written> {
    let mut files = vec![Written {
        what: "the shares".into(),
        paths: fs
            .iter()
            .filter(|f| !f.read_only)
            .map(|f| f.host_dir.clone())
            .collect(),
        bound: spec.share_quota.map_or(
            Bound::None("--share-quota SIZE bounds what the guest adds to its shares"),
            Bound::Bytes,
        ),
    }];
    if let Some(size) = layer {
        files.push(Written {
            what: "the writable layer".into(),
            paths: vec![disks::layer_path(&spec.name)],
            bound: Bound::Bytes(size),
        });
    }
    files.push(Written {
        what: "the console log".into(),
        paths: vec![dir.console_path()],
        bound: Bound::Bytes(CONSOLE_LOG_MAX),
    });
    files.push(Written {
        what: "the audit log".into(),
        paths: vec![paths::audit_dir()],
        bound: Bound::None(
            "keep the state directory, $SBX_STATE_DIR or ~/.local/state/sbx, on a disk",
        ),
    });
    files
}

/// The budget of a guest of `guest_bytes` whose session writes `written`.
pub fn budget(guest_bytes: u64, written: &[Written]) -> Memory {
    budget_with(guest_bytes, written, in_memory)
}

fn budget_with(guest_bytes: u64, written: &[Written], in_memory: impl Fn(&Path) -> bool) -> Memory {
    let mut parts = vec![
        Part {
            what: "guest RAM".into(),
            bytes: guest_bytes,
        },
        Part {
            what: "VMM allowance".into(),
            bytes: VMM_ALLOWANCE,
        },
    ];
    for w in written {
        let Some(path) = w.paths.iter().find(|p| in_memory(p)) else {
            continue;
        };
        match w.bound {
            Bound::Bytes(bytes) => parts.push(Part {
                what: format!("{} in memory ({})", w.what, path.display()),
                bytes,
            }),
            Bound::None(fix) => {
                return Memory::Unlimited(format!(
                    "{} at {} is kept in memory and has no bound ({fix})",
                    w.what,
                    path.display(),
                ))
            }
        }
    }
    Memory::Limited(parts)
}

/// linux/magic.h's, which the libc crate does not carry.
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;

/// Whether `path` (or, if it does not exist yet, its nearest existing
/// parent) is on a file system kept in memory. An overlay counts: its
/// upper layer may be, and counting it is the safe mistake.
pub fn in_memory(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `fs` is writable and
    // large enough for a statfs.
    if unsafe { libc::statfs(c.as_ptr(), fs.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded, so it filled `fs`.
    let kind = unsafe { fs.assume_init() }.f_type;
    [libc::TMPFS_MAGIC, RAMFS_MAGIC, libc::OVERLAYFS_SUPER_MAGIC].contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(what: &str, paths: &[&str], most: Option<u64>) -> Written {
        Written {
            what: what.into(),
            paths: paths.iter().map(PathBuf::from).collect(),
            bound: most.map_or(Bound::None("give it one"), Bound::Bytes),
        }
    }

    #[test]
    fn files_in_memory_add_their_bound_and_files_on_disk_nothing() {
        let files = [
            written("the writable layer", &["/mem/layer.ext4"], Some(300 << 20)),
            written("the shares", &["/disk/project"], None),
            written("the console log", &["/mem/console.log"], Some(16 << 20)),
            written(
                "the shares",
                &["/disk/a", "/mem/b", "/mem/c"],
                Some(8 << 20),
            ),
        ];
        let m = budget_with(256 << 20, &files, |p| p.starts_with("/mem"));
        // The quota of three shares, two in memory, counts once.
        assert_eq!(m.max(), Some((256 << 20) + VMM_ALLOWANCE + (324 << 20)));
        let Memory::Limited(parts) = &m else {
            unreachable!()
        };
        assert_eq!(parts.len(), 5, "{parts:?}");
        assert_eq!(parts[4].what, "the shares in memory (/mem/b)");
        assert_eq!(
            parts[2].what,
            "the writable layer in memory (/mem/layer.ext4)"
        );
        assert_eq!(m.to_json()["max"], m.max().unwrap());
    }

    #[test]
    fn a_file_in_memory_without_a_bound_leaves_memory_unlimited() {
        let files = [written("the shares", &["/mem/project"], None)];
        let m = budget_with(256 << 20, &files, |p| p.starts_with("/mem"));
        assert_eq!(m.max(), None);
        let said = m.to_json().as_str().unwrap().to_string();
        assert!(
            said.starts_with("not limited: the shares at /mem/project"),
            "{said}"
        );
        assert!(said.contains("give it one"), "{said}");
    }

    #[test]
    fn tmpfs_is_memory_and_a_missing_path_is_judged_by_its_parent() {
        assert!(in_memory(Path::new("/dev/shm")));
        assert!(in_memory(Path::new("/dev/shm/not/yet/made")));
        assert!(!in_memory(Path::new("/proc")));
    }
}
