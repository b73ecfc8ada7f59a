//! `cargo xtask bench`: builds release binaries and runs the benchmarks under
//! `benches/`, through the nested test host where this host cannot boot guests.

use std::process::Command;

use crate::{demo, kernel, paths, proc, rootfs};

/// Memory of the nested host for benchmarks: room for 1 GiB files in its
/// in-memory /tmp next to a guest.
const BENCH_NESTED_MEM_MIB: u64 = 6144;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Everything.
    All,
    /// Boot latency and memory, sbx against QEMU microvm and, given
    /// SBX_BENCH_FIRECRACKER, Firecracker (boots real guests).
    Boot,
    /// Network policy decisions per second (host only).
    Policy,
    /// The MCP gateway: time added per tool call against calling the
    /// server directly, and calls per second (host only).
    Mcp,
    /// The control plane: policy fetch latency at session start (host only).
    Server,
    /// The dashboard's pages with 1,000,000 audit records, on SQLite and
    /// PostgreSQL (host only).
    Dashboard,
    /// Exec round trip and vsock throughput of a session (boots a real guest).
    Session,
    /// Egress proxy: connection setup and tunnel throughput on the host's
    /// loopback, then a real guest fetching through it.
    Net,
    /// Shared-directory throughput and metadata speed against the host's own
    /// file system (boots real guests, one per cache mode, and a clone
    /// workspace on the base image).
    Fs,
    /// Images: time to agent-ready from the base image against the
    /// initramfs, and converting the base image.
    Images,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Boots per VMM, alternating (set SBX_BENCH_FIRECRACKER to a
    /// Firecracker binary to boot it too).
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let release = paths::target_dir().join("release");
    proc::step("building release sbx and benchmarks");
    proc::run(
        Command::new(env!("CARGO"))
            .current_dir(paths::workspace())
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "host-cli",
                "-p",
                "sbx-benches",
            ]),
    )?;
    if matches!(args.which, Which::All | Which::Net) {
        proc::step("egress proxy alone, on this host's loopback");
        proc::run(&mut Command::new(release.join("sbx-bench-net")))?;
    }
    if matches!(args.which, Which::All | Which::Mcp) {
        proc::step("MCP gateway, on this host");
        proc::run(&mut Command::new(release.join("sbx-bench-mcp")))?;
        if args.which == Which::Mcp {
            return Ok(0);
        }
    }
    if matches!(args.which, Which::All | Which::Server) {
        proc::step("sbx-server's policy fetch, on this host");
        proc::run(&mut Command::new(release.join("sbx-bench-server")))?;
        if args.which == Which::Server {
            return Ok(0);
        }
    }
    if matches!(args.which, Which::All | Which::Dashboard) {
        proc::step("dashboard pages with a million records, on SQLite");
        proc::run(&mut Command::new(release.join("sbx-bench-dashboard")))?;
        proc::step("the same on PostgreSQL");
        proc::run(Command::new(release.join("sbx-bench-dashboard")).arg("--postgres"))?;
        if args.which == Which::Dashboard {
            return Ok(0);
        }
    }
    if matches!(args.which, Which::All | Which::Policy) {
        proc::step("policy decisions");
        proc::run(&mut Command::new(release.join("sbx-bench-policy")))?;
        if args.which == Which::Policy {
            return Ok(0);
        }
    }
    let vmlinux = kernel::build()?;
    let initrd = rootfs::build()?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let images = [
        "--sbx".to_string(),
        path(&release.join("sbx")),
        "--kernel".into(),
        path(&vmlinux),
        "--initrd".into(),
        path(&initrd),
    ];
    let mut script = Vec::new();
    if matches!(args.which, Which::All | Which::Boot) {
        let mut argv = vec![
            path(&release.join("sbx-bench-boot")),
            "--runs".into(),
            args.runs.to_string(),
            "--vcpus".into(),
            args.vcpus.to_string(),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
    }
    if matches!(args.which, Which::All | Which::Session) {
        let mut argv = vec![path(&release.join("sbx-bench-session"))];
        argv.extend(images.iter().cloned());
        script.push(argv);
        // What the seccomp filters cost, filtered and unfiltered side by side.
        let mut argv = vec![
            path(&release.join("sbx-bench-session")),
            "--seccomp-cost".into(),
            "--runs".into(),
            "10".into(),
            "--mib".into(),
            "32".into(),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
        // What idle sessions cost the host, running and paused.
        let mut argv = vec![
            path(&release.join("sbx-bench-session")),
            "--idle".into(),
            "4".into(),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
    }
    if matches!(args.which, Which::All | Which::Net) {
        // Only the guest rows matter in the nested host (TCG slows the rest).
        let mut argv = vec![
            path(&release.join("sbx-bench-net")),
            "--guest".into(),
            "--connections".into(),
            "100".into(),
            "--mib".into(),
            "64".into(),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
    }
    if matches!(args.which, Which::All | Which::Fs | Which::Images) {
        // The clone workspace and image rows boot the base image.
        let store = crate::image::test_store(&release.join("sbx"))?;
        script.push(vec![
            "export".into(),
            format!("SBX_CACHE_DIR={}", store.display()),
        ]);
    }
    if matches!(args.which, Which::All | Which::Images) {
        let mut argv = vec![
            path(&release.join("sbx-bench-images")),
            "--archive".into(),
            path(&crate::image::build_base()?),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
    }
    if matches!(args.which, Which::All | Which::Fs) {
        let mut argv = vec![
            path(&release.join("sbx-bench-fs")),
            "--modes".into(),
            "auto,never,always,clone".into(),
        ];
        argv.extend(images.iter().cloned());
        script.push(argv);
    }
    // One shell runs them all, so the nested host boots once.
    let quote = |a: &String| format!("'{}'", a.replace('\'', ""));
    let line = script
        .iter()
        .map(|argv| argv.iter().map(quote).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" && ");
    let argv = vec!["sh".into(), "-c".into(), line];
    // The file benchmark writes 1 GiB to the nested host's in-memory /tmp.
    demo::run_real_guest(&release.join("sbx"), argv, 2400, BENCH_NESTED_MEM_MIB)
}
