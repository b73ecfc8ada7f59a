//! `cargo xtask kernel`: the guest kernel from Debian's linux-source-6.1 and
//! our config fragment, cached outside the checkout by a hash of its inputs.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::{deps, paths, proc};

const SOURCE_PKG: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the build recipe changes in a way that changes the output.
const RECIPE_VERSION: &str = "1";

pub fn fragment_path() -> PathBuf {
    paths::workspace().join("kernel-config/microvm.config")
}

/// One option the fragment asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    /// `None` for `# CONFIG_X is not set`.
    pub value: Option<String>,
    pub line: usize,
}

/// Parses a fragment; anything that is neither an option, a "not set" line,
/// a comment nor blank is an error naming the line.
pub fn parse_fragment(path: &Path, text: &str) -> anyhow::Result<Vec<Wanted>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let lineno = i + 1;
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") && !name.contains(' ') {
                    out.push(Wanted {
                        name: name.to_string(),
                        value: None,
                        line: lineno,
                    });
                }
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((name, value))
                if name.starts_with("CONFIG_")
                    && name[7..].chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !value.is_empty() =>
            {
                out.push(Wanted {
                    name: name.to_string(),
                    value: Some(value.to_string()),
                    line: lineno,
                });
            }
            _ => bail!(
                "{}:{lineno}: expected `CONFIG_NAME=value` or `# CONFIG_NAME is not set`, found `{line}`",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// The fragment options the final `.config` does not honour.
pub fn unmet(wanted: &[Wanted], config: &str) -> Vec<String> {
    let lookup = |name: &str| {
        config.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_string)
        })
    };
    wanted
        .iter()
        .filter_map(|w| {
            let actual = lookup(&w.name);
            match (&w.value, actual) {
                (Some(v), Some(a)) if *v == a => None,
                (Some(v), a) => Some(format!(
                    "line {}: {}={v} (final .config has {})",
                    w.line,
                    w.name,
                    a.map_or("it unset or unknown".into(), |a| format!("{}={a}", w.name))
                )),
                (None, None) => None,
                (None, Some(a)) => Some(format!(
                    "line {}: {} should be unset (final .config has {}={a})",
                    w.line, w.name, w.name
                )),
            }
        })
        .collect()
}

fn cache_key(fragment: &[u8], source_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update(source_version.as_bytes());
    h.update(fragment);
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn make(src: &Path, build: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86_64");
    c
}

/// Builds (or reuses) the kernel and points `<cache>/vmlinux` at it.
pub fn build() -> anyhow::Result<PathBuf> {
    let frag_path = fragment_path();
    let frag = std::fs::read(&frag_path)
        .with_context(|| format!("cannot read {}", frag_path.display()))?;
    let wanted = parse_fragment(&frag_path, &String::from_utf8_lossy(&frag))?;
    deps::ensure(deps::KERNEL_BUILD)?;
    let version = deps::version(SOURCE_PKG)?;
    let key = cache_key(&frag, &version);
    let cache = paths::cache_dir();
    let out_dir = cache.join("kernel").join(&key);
    let vmlinux = out_dir.join("vmlinux");
    let link = cache.join("vmlinux");

    if vmlinux.is_file() {
        proc::step(&format!("guest kernel {key} is cached"));
    } else {
        build_into(&out_dir, &cache, &frag_path, &wanted, &version, &key)?;
    }
    let tmp_link = cache.join(format!(".vmlinux.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&vmlinux, &tmp_link)?;
    std::fs::rename(&tmp_link, &link)?;
    Ok(vmlinux)
}

fn build_into(
    out_dir: &Path,
    cache: &Path,
    frag_path: &Path,
    wanted: &[Wanted],
    version: &str,
    key: &str,
) -> anyhow::Result<()> {
    let src = unpacked_source(cache, version)?;
    let build = cache.join("kernel").join(format!("{key}.build"));
    std::fs::create_dir_all(&build)?;
    proc::step(&format!(
        "configuring guest kernel {key} (allnoconfig + {})",
        frag_path.display()
    ));
    configure(&src, &build, frag_path, wanted)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    proc::step(&format!(
        "building guest kernel with {jobs} jobs (about 5 minutes on 2 cores)"
    ));
    let log_path = cache.join("kernel").join(format!("{key}.log"));
    compile_with_progress(
        make(&src, &build).arg(format!("-j{jobs}")).arg("vmlinux"),
        &log_path,
    )?;

    std::fs::create_dir_all(out_dir)?;
    std::fs::copy(build.join(".config"), out_dir.join("config"))?;
    let staged = out_dir.join("vmlinux.partial");
    std::fs::copy(build.join("vmlinux"), &staged)?;
    std::fs::rename(&staged, out_dir.join("vmlinux"))?;
    // The object tree is large and keyed by this hash only; drop it.
    let _ = std::fs::remove_dir_all(&build);
    Ok(())
}

/// The kernel source tree, unpacked into the cache once per source version.
fn unpacked_source(cache: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let src = cache.join(format!("linux-source-{version}"));
    if !src.join("Makefile").is_file() {
        proc::step(&format!("unpacking {SOURCE_TARBALL}"));
        let staging = cache.join(format!(".unpack.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        proc::run(
            Command::new("tar")
                .arg("-xf")
                .arg(SOURCE_TARBALL)
                .arg("-C")
                .arg(&staging),
        )?;
        let _ = std::fs::remove_dir_all(&src);
        std::fs::rename(staging.join("linux-source-6.1"), &src)?;
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(src)
}

/// allnoconfig with the fragment, olddefconfig, then the check that every
/// fragment option took. Fails fast, before anything is compiled.
fn configure(src: &Path, build: &Path, frag_path: &Path, wanted: &[Wanted]) -> anyhow::Result<()> {
    proc::output(
        make(src, build)
            .arg(format!("KCONFIG_ALLCONFIG={}", frag_path.display()))
            .arg("allnoconfig"),
    )?;
    proc::output(make(src, build).arg("olddefconfig"))?;
    let config = std::fs::read_to_string(build.join(".config"))?;
    let missing = unmet(wanted, &config);
    if !missing.is_empty() {
        bail!(
            "{} options in {} did not take in the final kernel config (misspelt, or a dependency is missing):\n  {}",
            missing.len(),
            frag_path.display(),
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// Configures (without compiling) a kernel for `frag_path` in a scratch
/// directory: how `cargo xtask test` proves that a bad fragment is caught.
pub fn check_fragment(frag_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(frag_path)
        .with_context(|| format!("cannot read {}", frag_path.display()))?;
    let wanted = parse_fragment(frag_path, &text)?;
    deps::ensure(deps::KERNEL_BUILD)?;
    let cache = paths::cache_dir();
    let src = unpacked_source(&cache, &deps::version(SOURCE_PKG)?)?;
    let build = cache
        .join("kernel")
        .join(format!(".check.{}", std::process::id()));
    std::fs::create_dir_all(&build)?;
    let result = configure(&src, &build, frag_path, &wanted);
    let _ = std::fs::remove_dir_all(&build);
    result
}

/// Runs make with its output in a log, showing how many files it has compiled.
fn compile_with_progress(cmd: &mut Command, log_path: &Path) -> anyhow::Result<()> {
    let mut log = std::fs::File::create(log_path)?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start make")?;
    // Merge stderr into the log from a second thread.
    let stderr = child.stderr.take();
    let log_err = log_path.to_path_buf();
    let err_thread = std::thread::spawn(move || -> String {
        let mut text = String::new();
        if let Some(e) = stderr {
            for line in BufReader::new(e).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_err)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        text
    });
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = Instant::now();
    let mut compiled = 0usize;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            writeln!(log, "{line}")?;
            if line.trim_start().starts_with("CC ") {
                compiled += 1;
            }
            let every = if tty {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(30)
            };
            if last.elapsed() >= every {
                last = Instant::now();
                let msg = format!(
                    "    kernel: {compiled} files compiled, {}s",
                    start.elapsed().as_secs()
                );
                if tty {
                    eprint!("\r{msg}");
                } else {
                    eprintln!("{msg}");
                }
            }
        }
    }
    let status = child.wait()?;
    let errors = err_thread.join().unwrap_or_default();
    if tty {
        eprintln!();
    }
    if !status.success() {
        let tail: Vec<&str> = errors.lines().rev().take(20).collect();
        bail!(
            "kernel build failed ({status}); full log: {}\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!(
        "    kernel: {compiled} files compiled in {}s",
        start.elapsed().as_secs()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_option_is_reported_with_its_line() {
        let frag = "# comment\nCONFIG_VIRTIO=y\nCONFIG_VIRTIO_FZ=y\n# CONFIG_PCI is not set\n";
        let wanted = parse_fragment(Path::new("f"), frag).unwrap();
        assert_eq!(wanted.len(), 3);
        let config = "CONFIG_VIRTIO=y\n# CONFIG_PCI is not set\n";
        let missing = unmet(&wanted, config);
        assert_eq!(missing.len(), 1);
        assert!(
            missing[0].contains("line 3: CONFIG_VIRTIO_FZ=y"),
            "{}",
            missing[0]
        );
    }

    #[test]
    fn unset_option_that_is_on_is_reported() {
        let wanted = parse_fragment(Path::new("f"), "# CONFIG_PCI is not set\n").unwrap();
        assert_eq!(unmet(&wanted, "CONFIG_PCI=y\n").len(), 1);
        assert!(unmet(&wanted, "").is_empty());
    }

    #[test]
    fn value_mismatch_is_reported() {
        let wanted = parse_fragment(Path::new("f"), "CONFIG_NR_CPUS=8\n").unwrap();
        assert!(unmet(&wanted, "CONFIG_NR_CPUS=8\n").is_empty());
        assert!(unmet(&wanted, "CONFIG_NR_CPUS=64\n")[0].contains("CONFIG_NR_CPUS=64"));
        // A prefix of another option's name must not count as set.
        let w = parse_fragment(Path::new("f"), "CONFIG_VIRTIO=y\n").unwrap();
        assert_eq!(unmet(&w, "CONFIG_VIRTIO_MMIO=y\n").len(), 1);
    }

    #[test]
    fn garbage_line_is_an_error_naming_file_and_line() {
        let e = parse_fragment(Path::new("frag.config"), "CONFIG_A=y\nVIRTIO=y\n").unwrap_err();
        assert!(e.to_string().starts_with("frag.config:2:"), "{e}");
    }

    #[test]
    fn the_shipped_fragment_parses_and_has_what_the_vmm_needs() {
        let path = fragment_path();
        let text = std::fs::read_to_string(&path).unwrap();
        let wanted = parse_fragment(&path, &text).unwrap();
        for needed in [
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_X86_IOPL_IOPERM",
            "CONFIG_KVM_GUEST",
            "CONFIG_X86_MPPARSE",
        ] {
            assert!(
                wanted
                    .iter()
                    .any(|w| w.name == needed && w.value.as_deref() == Some("y")),
                "{needed}"
            );
        }
    }

    #[test]
    fn key_depends_on_fragment_and_source() {
        assert_ne!(cache_key(b"a", "1"), cache_key(b"b", "1"));
        assert_ne!(cache_key(b"a", "1"), cache_key(b"a", "2"));
        assert_eq!(cache_key(b"a", "1").len(), 16);
    }
}
