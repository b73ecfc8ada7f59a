//! `cargo xtask demo`: from a fresh machine to a command run in a sandbox.

use std::path::PathBuf;
use std::process::Command;

use crate::{kernel, nested, paths, proc, rootfs};

/// Builds the `sbx` binary and returns its path.
pub fn build_sbx() -> anyhow::Result<PathBuf> {
    proc::step("building sbx");
    proc::run(
        Command::new(env!("CARGO"))
            .current_dir(paths::workspace())
            .args(["build", "--quiet", "-p", "host-cli"]),
    )?;
    Ok(paths::target_dir().join("debug/sbx"))
}

/// True when `sbx doctor` says sandboxes run directly on this host.
pub fn host_can_boot(sbx: &std::path::Path) -> bool {
    Command::new(sbx)
        .arg("doctor")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `argv` directly when this host can boot guests, else in the nested test host.
pub fn run_real_guest(
    sbx: &std::path::Path,
    argv: Vec<String>,
    timeout_secs: u64,
    nested_mem_mib: u64,
) -> anyhow::Result<u8> {
    if host_can_boot(sbx) {
        let status = Command::new(&argv[0]).args(&argv[1..]).status()?;
        Ok(status.code().unwrap_or(1) as u8)
    } else {
        proc::step("this host's /dev/kvm cannot boot standard guests (see `sbx doctor`); using the nested test host");
        let mut args = nested::Args::for_command(argv, timeout_secs);
        args.mem = nested_mem_mib;
        nested::run(args)
    }
}

pub fn run() -> anyhow::Result<u8> {
    kernel::build()?;
    rootfs::build()?;
    let sbx = build_sbx()?;
    proc::step(
        "running `uname -a` in a sandbox (sbx run: a session over vsock, removed afterwards)",
    );
    let argv = vec![
        sbx.to_string_lossy().into_owned(),
        "run".into(),
        "--".into(),
        "uname".into(),
        "-a".into(),
    ];
    let code = run_real_guest(&sbx, argv, 300, nested::DEFAULT_MEM_MIB)?;
    if code != 0 {
        anyhow::bail!("the sandboxed command failed with exit status {code}");
    }
    Ok(0)
}
