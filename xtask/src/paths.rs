//! Where things live: the checkout and the build cache outside it.

use std::path::PathBuf;

/// The workspace root (the parent of this crate).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Same rule as `sbx`: `$SBX_CACHE_DIR`, else `$XDG_CACHE_HOME/sbx`, else `~/.cache/sbx`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SBX_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(home).join(".cache"))
        .join("sbx")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Writes `path` atomically: a temporary sibling renamed into place, so an
/// interrupted build never leaves a half-written artifact behind.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename into {}", path.display()))
}
