//! `cargo xtask`: builds what cargo alone cannot (guest kernel, rootfs, the
//! nested test host) and drives the demo and the whole test suite.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cpio;
mod demo;
mod deps;
mod fuzz;
mod image;
mod kernel;
mod nested;
mod paths;
mod proc;
mod rootfs;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build and test sbx end to end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest kernel (cached by config hash outside the checkout).
    Kernel,
    /// Build the guest initramfs: the static guest agent as /init plus busybox.
    Rootfs,
    /// Build a guest image (`base`: Debian, Python, build tools, Node.js 22, user `agent`).
    Image(image::Args),
    /// Run a command inside the nested test host (a QEMU VM with a real /dev/kvm).
    Nested(nested::Args),
    /// Install what is missing, build everything and run `uname -a` in a sandbox.
    Demo,
    /// Run fmt, clippy, unit tests and the real-guest tests.
    Test(test::Args),
    /// Run the benchmarks under benches/ and print their numbers.
    Bench(bench::Args),
    /// Fuzz the parsers a guest or a policy file feeds (cargo fuzz, nightly).
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kernel => kernel::build().map(|p| {
            println!("{}", p.display());
            0
        }),
        Command::Rootfs => rootfs::build().map(|p| {
            println!("{}", p.display());
            0
        }),
        Command::Image(args) => image::run(args),
        Command::Nested(args) => nested::run(args),
        Command::Demo => demo::run(),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
