//! `cargo xtask rootfs`: the minimal guest initramfs. The static guest agent
//! is `/init`; Debian's static busybox provides a shell and coreutils.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::cpio::Archive;
use crate::{deps, paths, proc};

pub const BUSYBOX: &str = "/bin/busybox";
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the guest agent as a static binary and returns its path.
pub fn build_guest_agent() -> anyhow::Result<PathBuf> {
    proc::step("building the static guest agent");
    // The explicit --target keeps crt-static away from host build scripts and proc macros.
    proc::run(
        Command::new(env!("CARGO"))
            .current_dir(paths::workspace())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "guest-agent",
                "--target",
                GUEST_TARGET,
            ]),
    )?;
    let bin = paths::target_dir()
        .join(GUEST_TARGET)
        .join("release/sbx-guest-agent");
    check_static(&bin)?;
    Ok(bin)
}

/// A dynamically linked /init would fail at boot with a bare "not found"; catch it here.
fn check_static(bin: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    if has_interpreter(&data) {
        bail!(
            "{} is dynamically linked; the guest has no libc to load",
            bin.display()
        );
    }
    Ok(())
}

/// True when a 64-bit ELF has a PT_INTERP program header (needs a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let Some(phoff) = elf
        .get(32..40)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    else {
        return false;
    };
    let (size, count) = (u16_at(54), u16_at(56));
    (0..count).any(|i| {
        let at = phoff + i * size;
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) == PT_INTERP)
    })
}

/// busybox applets as paths relative to /, e.g. "bin/sh".
fn busybox_applets() -> anyhow::Result<Vec<String>> {
    let list = proc::output(Command::new(BUSYBOX).arg("--list-full"))?;
    Ok(list
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox")
        .collect())
}

pub fn build() -> anyhow::Result<PathBuf> {
    deps::ensure(deps::ROOTFS)?;
    let agent = build_guest_agent()?;
    proc::step("writing the guest initramfs");
    let mut a = Archive::default();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        "workspace",
    ] {
        a.dir(d);
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file("init", 0o755, &std::fs::read(&agent)?);
    a.file("bin/busybox", 0o755, &std::fs::read(BUSYBOX)?);
    for applet in busybox_applets()? {
        a.symlink(&applet, "/bin/busybox");
    }
    a.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    a.file("etc/group", 0o644, b"root:x:0:\n");
    a.file("etc/hostname", 0o644, b"sbx\n");

    let cache = paths::cache_dir();
    std::fs::create_dir_all(&cache)?;
    let out = cache.join("initramfs.cpio");
    paths::write_atomic(&out, &a.finish())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_binaries_are_dynamic() {
        // The test binary itself is dynamically linked; busybox-static is not.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        if let Ok(bb) = std::fs::read(BUSYBOX) {
            assert!(!has_interpreter(&bb));
        }
    }
}
