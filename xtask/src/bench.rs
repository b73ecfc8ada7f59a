//! `cargo xtask bench`: builds release binaries and runs the benchmarks under
//! `benches/`, through the nested test host where this host cannot boot guests.

use std::process::Command;

use crate::{demo, kernel, paths, proc, rootfs};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Everything.
    All,
    /// Boot latency and memory, sbx against QEMU (boots real guests).
    Boot,
    /// Network policy decisions per second (host only).
    Policy,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
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
    if args.which != Which::Boot {
        proc::step("policy decisions");
        proc::run(&mut Command::new(release.join("sbx-bench-policy")))?;
        if args.which == Which::Policy {
            return Ok(0);
        }
    }
    let vmlinux = kernel::build()?;
    let initrd = rootfs::build()?;
    let argv: Vec<String> = vec![
        release
            .join("sbx-bench-boot")
            .to_string_lossy()
            .into_owned(),
        "--runs".into(),
        args.runs.to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--sbx".into(),
        release.join("sbx").to_string_lossy().into_owned(),
        "--kernel".into(),
        vmlinux.to_string_lossy().into_owned(),
        "--initrd".into(),
        initrd.to_string_lossy().into_owned(),
    ];
    demo::run_real_guest(&release.join("sbx"), argv, 1800)
}
