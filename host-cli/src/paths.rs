//! Where sbx keeps things: the guest kernel and rootfs that `cargo xtask`
//! builds, audit logs, and policy files.

use std::path::PathBuf;

/// `$<over>` if set, else `$<xdg>/sbx`, else `~/<fallback>/sbx`.
fn xdg_dir(over: &str, xdg: &str, fallback: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(over) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os(xdg).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(fallback)
    });
    base.join("sbx")
}

/// `$SBX_CACHE_DIR`, else `$XDG_CACHE_HOME/sbx`, else `~/.cache/sbx`.
pub fn cache_dir() -> PathBuf {
    xdg_dir("SBX_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
}

/// Durable state (audit logs): `$SBX_STATE_DIR`, else
/// `$XDG_STATE_HOME/sbx`, else `~/.local/state/sbx`.
pub fn state_dir() -> PathBuf {
    xdg_dir("SBX_STATE_DIR", "XDG_STATE_HOME", ".local/state")
}

pub fn audit_dir() -> PathBuf {
    state_dir().join("audit")
}

/// The user's (team) policy: `$XDG_CONFIG_HOME/sbx`, else `~/.config/sbx`.
pub fn config_dir() -> PathBuf {
    xdg_dir("SBX_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")
}

/// Machine-wide configuration, where an organisation puts its signed policy
/// and trusted keys: `$SBX_SYSTEM_DIR`, else `/etc/sbx`.
pub fn system_dir() -> PathBuf {
    std::env::var_os("SBX_SYSTEM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/sbx"))
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
