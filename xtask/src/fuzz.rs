//! `cargo xtask fuzz`: runs the fuzz targets (the policy's parser and
//! matcher, the egress proxy's request heads and ClientHellos, the agent
//! protocol's frames, and the VMM's virtio transport and queues, vsock
//! muxer and file-sharing requests) with cargo-fuzz on the nightly toolchain (installing
//! cargo-fuzz from crates.io if it is missing).

use std::process::Command;

use anyhow::bail;

use crate::{paths, proc};

/// Each target and the crate whose `fuzz/` folder holds it.
pub const TARGETS: [(&str, &str); 8] = [
    ("policy", "parse"),
    ("policy", "decide"),
    ("egress", "head"),
    ("egress", "client_hello"),
    ("protocol", "frames"),
    ("vmm", "virtio_queue"),
    ("vmm", "vsock_muxer"),
    ("vmm", "fs_requests"),
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Only this target (parse, decide, head, client_hello, frames,
    /// virtio_queue, vsock_muxer or fs_requests).
    #[arg(long)]
    target: Option<String>,
}

pub fn has_nightly() -> bool {
    proc::output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_ok()
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if proc::output(Command::new(env!("CARGO")).args(["fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    proc::step("installing cargo-fuzz from crates.io");
    proc::run(Command::new(env!("CARGO")).args(["install", "--quiet", "--locked", "cargo-fuzz"]))
}

/// Runs each target for `seconds`; a crash fails with the artifact's path.
pub fn run_targets(targets: &[(&str, &str)], seconds: u64) -> anyhow::Result<()> {
    if !has_nightly() {
        bail!("cargo fuzz needs the nightly toolchain: `rustup toolchain install nightly`");
    }
    ensure_cargo_fuzz()?;
    for (krate, t) in targets {
        let dir = paths::workspace().join(krate);
        proc::step(&format!("fuzzing {t} for {seconds} s"));
        let corpus = dir.join("fuzz/corpus").join(t);
        proc::run(
            Command::new("rustup")
                .current_dir(&dir)
                .args(["run", "nightly", "cargo", "fuzz", "run", "-O", t])
                .arg(&corpus)
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    "-max_len=4096",
                    "-print_final_stats=1",
                ]),
        )?;
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let targets: Vec<(&str, &str)> = match &args.target {
        Some(t) => match TARGETS.iter().find(|(_, name)| name == t) {
            Some(target) => vec![*target],
            None => {
                let names: Vec<&str> = TARGETS.iter().map(|(_, n)| *n).collect();
                bail!(
                    "unknown fuzz target `{t}`: the targets are {}",
                    names.join(", ")
                )
            }
        },
        None => TARGETS.to_vec(),
    };
    run_targets(&targets, args.seconds)?;
    Ok(0)
}
