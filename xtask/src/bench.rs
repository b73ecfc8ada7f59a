//! `cargo xtask bench`: builds release binaries and runs the benchmarks under
//! `benches/`, through the nested test host where this host cannot boot guests.

use std::process::Command;

use crate::{demo, kernel, paths, proc, rootfs};

#[derive(clap::Args)]
pub struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let vmlinux = kernel::build()?;
    let initrd = rootfs::build()?;
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
    let release = paths::target_dir().join("release");
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
