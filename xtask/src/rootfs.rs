//! `cargo xtask rootfs`: the minimal guest initramfs. The static guest agent
//! is `/init`; Debian's static busybox provides a shell and coreutils.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::cpio::Archive;
use crate::{deps, paths, proc};

pub const BUSYBOX: &str = "/bin/busybox";
/// Debian's git (package `git`, with its HTTPS helper) and curl, with the
/// libraries they load: agents commit in /workspace and fetch through the
/// egress proxy, and the tests run both.
const DYNAMIC: [&str; 3] = [
    "/usr/bin/git",
    "/usr/lib/git-core/git-remote-https",
    "/usr/bin/curl",
];
/// Debian's bundle of public roots (package `ca-certificates`); the guest
/// agent appends the session's CA to it at boot.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
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
/// The shared libraries `bin` loads (and the loader), as `ldd` lists them.
fn shared_libraries(bin: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = proc::output(Command::new("ldd").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Adds dynamically linked host binaries and their libraries (each once) at
/// the paths they have on a merged-/usr Debian (`/lib` and `/lib64` are
/// links).
fn add_dynamic(a: &mut Archive, bins: &[&str]) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for bin in bins {
        files.push(PathBuf::from(bin));
        for lib in shared_libraries(bin)? {
            if !files.contains(&lib) {
                files.push(lib);
            }
        }
    }
    // `build` made these already.
    let mut made: std::collections::HashSet<PathBuf> = ["usr", "usr/bin", "etc"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for f in files {
        // Keep the name the loader asks for (libz.so.1, not the file it
        // links to), in the directory's real place.
        let (Some(parent), Some(name)) = (f.parent(), f.file_name()) else {
            continue;
        };
        let real = std::fs::canonicalize(parent)
            .with_context(|| format!("cannot find {} (needed by {bins:?})", f.display()))?
            .join(name);
        let rel = real.strip_prefix("/").unwrap_or(&real);
        let mut dir = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            dir.push(c);
            if made.insert(dir.clone()) {
                a.dir(&dir.to_string_lossy());
            }
        }
        let data = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
        a.file(&rel.to_string_lossy(), 0o755, &data);
    }
    Ok(())
}

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
    a.symlink("lib", "usr/lib");
    a.symlink("lib64", "usr/lib64");
    add_dynamic(&mut a, &DYNAMIC)?;
    for d in ["etc/ssl", "etc/ssl/certs"] {
        a.dir(d);
    }
    let bundle = std::fs::read(CA_BUNDLE).with_context(|| {
        format!("cannot read {CA_BUNDLE}; install it with: sudo apt-get install -y ca-certificates")
    })?;
    a.file(&CA_BUNDLE[1..], 0o644, &bundle);
    // Empty, so that `git init` does not warn about missing templates.
    for d in [
        "usr/share",
        "usr/share/git-core",
        "usr/share/git-core/templates",
    ] {
        a.dir(d);
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
