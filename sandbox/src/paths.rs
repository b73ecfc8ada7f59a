//! Where sbx keeps things: the guest kernel and rootfs that `cargo xtask`
//! builds, audit logs, secrets and live sessions. The policy's own places
//! (system and config directories) are [`sbx_policy::Locations`].

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sbx_policy::xdg_dir;

use crate::error::{fail, At, Result};

/// `$SBX_CACHE_DIR`, else `$XDG_CACHE_HOME/sbx`, else `~/.cache/sbx`.
pub fn cache_dir() -> PathBuf {
    xdg_dir("SBX_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
}

/// Durable state (audit logs, secrets): `$SBX_STATE_DIR`, else
/// `$XDG_STATE_HOME/sbx`, else `~/.local/state/sbx`.
pub fn state_dir() -> PathBuf {
    xdg_dir("SBX_STATE_DIR", "XDG_STATE_HOME", ".local/state")
}

/// Every session's audit log on this machine, sorted.
pub fn session_logs() -> crate::Result<Vec<PathBuf>> {
    use crate::error::At;
    let dir = audit_dir();
    let mut logs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).at(|| format!("cannot list {}", dir.display())),
    };
    logs.sort();
    Ok(logs)
}

pub fn audit_dir() -> PathBuf {
    state_dir().join("audit")
}

/// The user's configuration (team policy, the secrets' key):
/// `$SBX_CONFIG_DIR`, else `$XDG_CONFIG_HOME/sbx`, else `~/.config/sbx`.
pub fn config_dir() -> PathBuf {
    sbx_policy::Locations::here().config
}

/// Live sessions' sockets and state: `$SBX_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/sbx`, else `/run/sbx` for root and `/tmp/sbx-<uid>`
/// for others.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SBX_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("sbx");
    }
    // SAFETY: getuid cannot fail.
    match unsafe { libc::getuid() } {
        0 => PathBuf::from("/run/sbx"),
        uid => std::env::temp_dir().join(format!("sbx-{uid}")),
    }
}

/// Makes `dir` (and its parents) if need be and checks that it is this
/// user's alone: sessions' sockets, audit logs and secrets live in such
/// directories. One that another user owns is refused (in a shared /tmp,
/// someone could have made it first to reach what sbx puts there); one of
/// ours that others can reach is made private.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .at(|| format!("cannot create {}", dir.display()))?;
    // A symlink to a directory of one's own (another disk) is fine: what
    // it leads to is checked.
    let md = std::fs::metadata(dir).at(|| format!("cannot read {}", dir.display()))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() {
        fail!(
            Invalid,
            "{} is not a directory; sbx keeps private state there: remove it",
            dir.display()
        );
    }
    if md.uid() != me {
        fail!(
            Invalid,
            "{} belongs to uid {}, not to you (uid {me}); sbx keeps sessions' sockets, \
             audit logs and secrets in it and will not share them: remove it, or point \
             SBX_RUNTIME_DIR or SBX_STATE_DIR somewhere of your own",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .at(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(())
}

pub fn default_kernel() -> PathBuf {
    std::env::var_os("SBX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("vmlinux"))
}

pub fn default_initrd() -> PathBuf {
    std::env::var_os("SBX_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("initramfs.cpio"))
}
