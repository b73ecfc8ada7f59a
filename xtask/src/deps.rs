//! Debian packages the build needs, installed with apt when missing.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;

use crate::proc;

pub const KERNEL_BUILD: &[&str] = &[
    "linux-source-6.1",
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];
pub const ROOTFS: &[&str] = &["busybox-static", "git", "curl", "ca-certificates"];
pub const NESTED: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];
/// Building and converting guest images.
pub const IMAGES: &[&str] = &["mmdebstrap", "e2fsprogs", "curl"];
/// What the tests drive sbx with (`sbx shell` runs under tmux; images are
/// pushed with skopeo to a real registry; the MCP test server is Python).
pub const TESTS: &[&str] = &[
    "tmux",
    "docker-registry",
    "skopeo",
    "python3",
    "postgresql",
    "chromium",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

static UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs whichever of `pkgs` are missing (`apt-get update` first, once).
pub fn ensure(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages: {}; install them with: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    proc::step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    if !UPDATED.swap(true, Ordering::SeqCst) {
        proc::run(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    proc::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The installed version of `pkg`, for cache keys.
pub fn version(pkg: &str) -> anyhow::Result<String> {
    proc::output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", pkg]))
}
