//! Where sbx finds the guest kernel and rootfs that `cargo xtask` builds.

use std::path::PathBuf;

/// `$SBX_CACHE_DIR`, else `$XDG_CACHE_HOME/sbx`, else `~/.cache/sbx`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SBX_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("sbx")
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
