//! `cargo xtask test`: formatting, lints, unit tests, then the real-guest
//! tests, which boot real guests (in the nested test host where this host's
//! KVM cannot).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::{demo, fuzz, image, kernel, paths, proc, rootfs};

#[derive(clap::Args)]
pub struct Args {
    /// Skip fmt and clippy (for quick iterations on the real-guest tests).
    #[arg(long)]
    no_lint: bool,
    /// Only run tests whose name contains this string (passed to the test binaries).
    #[arg(long)]
    filter: Option<String>,
    /// Skip the short fuzz run of the policy targets.
    #[arg(long)]
    no_fuzz: bool,
}

/// Sums libtest's "test result:" lines.
#[derive(Default, Debug, PartialEq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Counts a check that xtask runs itself as one test, naming it among
    /// the failures when it fails.
    fn check(
        &mut self,
        name: &'static str,
        result: anyhow::Result<()>,
        failures: &mut Vec<&'static str>,
    ) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                eprintln!("{e:#}");
                self.failed += 1;
                failures.push(name);
            }
        }
    }

    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cmd`, echoing its output and counting test results.
fn run_counting(cmd: &mut Command, tally: &mut Tally) -> anyhow::Result<bool> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the test command")?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            tally.add_line(&line);
        }
    }
    Ok(child.wait()?.success())
}

fn cargo() -> Command {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(paths::workspace());
    c
}

/// The shipped fragment plus `CONFIG_VIRTIO_FZ=y` must fail naming that option.
fn misspelt_fragment_is_caught() -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(kernel::fragment_path())?;
    text.push_str("CONFIG_VIRTIO_FZ=y\n");
    let path = std::env::temp_dir().join(format!("sbx-misspelt-{}.config", std::process::id()));
    std::fs::write(&path, &text)?;
    let result = kernel::check_fragment(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Err(e) if e.to_string().contains("CONFIG_VIRTIO_FZ=y") => {
            eprintln!(
                "    ok: {}",
                e.to_string().lines().last().unwrap_or_default().trim()
            );
            Ok(())
        }
        Err(e) => bail!("kernel fragment check failed for another reason: {e:#}"),
        Ok(()) => bail!("kernel fragment check accepted CONFIG_VIRTIO_FZ=y"),
    }
}

/// Builds the real-guest test binaries and returns their paths.
/// Whether `bin` is cargo's build of the test file `name.rs`
/// (`name-<hash>`).
fn is_test_binary(bin: &Path, name: &str) -> bool {
    bin.file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.rsplit_once('-'))
        .is_some_and(|(stem, hash)| stem == name && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Makes the nested test host ready for an ordinary user, uid 1000, as a
/// desktop host is: /dev/kvm open to their group, a cgroup delegated to
/// them (as systemd's user@1000.service is), a home in /tmp. Only ever run
/// in the nested host, which is thrown away after the run. [`passable`]
/// goes first.
const AS_USER: &str = r#"set -e
chgrp 1000 /dev/kvm && chmod 660 /dev/kvm
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir -p /sys/fs/cgroup/user-1000/init
chown 1000:1000 /sys/fs/cgroup/user-1000 /sys/fs/cgroup/user-1000/cgroup.procs \
  /sys/fs/cgroup/user-1000/cgroup.subtree_control /sys/fs/cgroup/user-1000/cgroup.threads
chown -R 1000:1000 /sys/fs/cgroup/user-1000/init
echo $$ > /sys/fs/cgroup/user-1000/init/cgroup.procs
mkdir -p /tmp/home-1000 && chown 1000:1000 /tmp/home-1000
# A disk that fills up, for the audit log's test (only root can mount one).
mkdir -p /run/sbx-tiny && mount -t tmpfs -o size=1m,uid=1000,gid=1000,mode=0700 tmpfs /run/sbx-tiny
# A directory on a disk (the run's 9p scratch share), not in memory as
# /tmp is here, for the memory limit's test.
disk="$SBX_NESTED_SCRATCH/disk-1000"
mkdir -p "$disk" && chown 1000:1000 "$disk" && chmod 700 "$disk"
export HOME=/tmp/home-1000 SBX_TEST_TINY_DIR=/run/sbx-tiny SBX_TEST_DISK_DIR="$disk"
# Their own state directory, not the run's scratch one (root's).
unset SBX_STATE_DIR
# The tests' stand-ins for real servers listen on 443.
echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start
unset XDG_RUNTIME_DIR
cd /tmp
set +e
"#;
/// Lines that let that user through the directories on the way to the
/// checkout and the caches which only their owner may enter (a checkout
/// under /root): each gets an in-memory overlay in the nested host, so
/// that it may be entered there; the host's own stays as it is.
fn passable(paths: &[PathBuf]) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mut closed: Vec<&Path> = paths
        .iter()
        .flat_map(|p| p.ancestors())
        .filter(|d| {
            std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 == 0)
        })
        .collect();
    // Outer directories first, each once.
    closed.sort_by_key(|d| d.components().count());
    closed.dedup();
    closed
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = d.display();
            format!(
                "mkdir -p /run/passable/{i}/u /run/passable/{i}/w\n\
                 mount -t overlay overlay -o lowerdir='{d}',upperdir=/run/passable/{i}/u,workdir=/run/passable/{i}/w '{d}'\n\
                 chmod o+x '{d}'\n"
            )
        })
        .collect()
}

/// Runs a test binary as that user, in their group alone.
const AS_USER_RUN: &str = "setpriv --reuid=1000 --regid=1000 --clear-groups -- ";

fn build_guest_tests() -> anyhow::Result<Vec<PathBuf>> {
    let out = proc::output(cargo().args([
        "test",
        "-p",
        "sbx-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == true {
            if let Some(exe) = v["executable"].as_str() {
                bins.push(PathBuf::from(exe));
            }
        }
    }
    if bins.is_empty() {
        bail!("no real-guest test binaries were built");
    }
    Ok(bins)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut tally = Tally::default();
    let mut failures: Vec<&str> = Vec::new();
    if !args.no_lint {
        proc::step("cargo fmt --check");
        if proc::run(cargo().args(["fmt", "--all", "--check"])).is_err() {
            failures.push("cargo fmt --check");
        }
        proc::step("cargo clippy --all-targets -- -D warnings");
        if proc::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))
        .is_err()
        {
            failures.push("clippy");
        }
    }
    // The unit tests run real programs too (the MCP gateway's test server
    // is a Python script).
    crate::deps::ensure(crate::deps::TESTS)?;
    proc::step("unit tests");
    let mut unit = cargo();
    // Every test binary runs even when one fails, so one failure hides no other.
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "sbx-tests",
        "--no-fail-fast",
    ]);
    if let Some(f) = &args.filter {
        unit.args(["--", f]);
    }
    if !run_counting(&mut unit, &mut tally)? {
        failures.push("unit tests");
    }
    // sbx-server's own tests run on both databases; the CLI's, which start
    // a server through sbx-tests, run again with theirs in PostgreSQL.
    proc::step("the CLI's control-plane tests, on PostgreSQL");
    let mut pg = cargo();
    pg.args(["test", "-p", "host-cli", "--test", "login"])
        .env("SBX_TEST_DATABASE", "postgres");
    if let Some(f) = &args.filter {
        pg.args(["--", f]);
    }
    if !run_counting(&mut pg, &mut tally)? {
        failures.push("control-plane tests on PostgreSQL");
    }

    // A short run keeps the fuzz targets building and catches shallow
    // crashes; `cargo xtask fuzz` runs them for real.
    if !args.no_fuzz {
        if fuzz::has_nightly() {
            let r = fuzz::run_targets(&fuzz::TARGETS, 20);
            tally.check("fuzz smoke run", r, &mut failures);
        } else {
            proc::step("fuzz smoke run skipped: cargo fuzz needs a nightly toolchain");
            tally.ignored += 1;
        }
    }

    let vmlinux = kernel::build()?;
    proc::step("a misspelt option in a kernel fragment is caught");
    tally.check(
        "kernel fragment check",
        misspelt_fragment_is_caught(),
        &mut failures,
    );
    let initrd = rootfs::build()?;
    let sbx = demo::build_sbx()?;
    let images = image::test_store(&sbx)?;
    // A failed build is one failure (the agent templates' test fails
    // too); the other real-guest tests still run.
    let built = image::test_templates(
        &sbx,
        &images,
        &[("SBX_KERNEL", &vmlinux), ("SBX_INITRD", &initrd)],
    );
    tally.check("agent templates build", built, &mut failures);
    proc::step("building real-guest tests");
    let bins = build_guest_tests()?;
    proc::step("real-guest tests");
    // One shell runs every binary, so the nested host boots once.
    let filter = args
        .filter
        .as_deref()
        .map(|f| format!(" '{}'", f.replace('\'', "")))
        .unwrap_or_default();
    let nested = !demo::host_can_boot(&sbx);
    // In the nested test host the suite runs as an ordinary user (see
    // AS_USER); the users test plays users itself, as root. On a host
    // that boots guests, it runs as whoever runs it.
    let as_user = if nested { AS_USER_RUN } else { "" };
    let mut script: String = bins
        .iter()
        .map(|b| {
            let run = if is_test_binary(b, "users") {
                ""
            } else {
                as_user
            };
            format!("{run}'{}' --test-threads=1{filter} || rc=1\n", b.display())
        })
        .collect();
    // The control plane's real-guest test again, its server on PostgreSQL.
    for b in bins.iter().filter(|b| is_test_binary(b, "server")) {
        script.push_str(&format!(
            "SBX_TEST_DATABASE=postgres {as_user}'{}' --test-threads=1{filter} || rc=1\n",
            b.display()
        ));
    }
    let setup = if nested {
        let reached = [paths::workspace(), paths::target_dir(), paths::cache_dir()];
        format!("set -e\n{}{AS_USER}", passable(&reached))
    } else {
        String::new()
    };
    let argv = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{setup}export SBX_BIN='{}' SBX_KERNEL='{}' SBX_INITRD='{}' SBX_TEST_IMAGES='{}'\nrc=0\n{script}exit $rc",
            sbx.display(),
            vmlinux.display(),
            initrd.display(),
            images.display()
        ),
    ];
    let mut guest = Command::new(std::env::current_exe()?);
    if nested {
        proc::step("this host's /dev/kvm cannot boot standard guests; running them in the nested test host, as uid 1000");
        guest
            .args(["nested", "--timeout", "2400", "--"])
            .args(&argv);
    } else {
        guest.args(&argv);
    }
    if !run_counting(&mut guest, &mut tally)? {
        failures.push("real-guest tests");
    }

    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    if failures.is_empty() {
        Ok(0)
    } else {
        eprintln!("xtask test: failed: {}", failures.join(", "));
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_closed_directories_are_made_passable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xtask-passable-{}", std::process::id()));
        let closed = dir.join("closed");
        let inner = closed.join("open/checkout");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let lines = passable(&[inner.clone(), inner]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(lines.matches("mount -t overlay").count(), 1, "{lines}");
        assert!(
            lines.contains(&format!("chmod o+x '{}'", closed.display())),
            "{lines}"
        );
    }

    #[test]
    fn test_binaries_are_known_by_their_file() {
        assert!(is_test_binary(
            Path::new("/t/deps/server-0123abcd"),
            "server"
        ));
        assert!(!is_test_binary(
            Path::new("/t/deps/sbx_server-0123abcd"),
            "server"
        ));
        assert!(!is_test_binary(Path::new("/t/deps/server-xyz"), "server"));
    }

    #[test]
    fn tally_reads_libtest_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 28 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Tally {
                passed: 31,
                failed: 2,
                ignored: 1
            }
        );
    }
}
