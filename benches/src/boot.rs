//! Boot benchmark: boots the same kernel and initramfs N times with sbx and
//! with QEMU `-M microvm` (same memory, vCPUs and command line, same host) and
//! prints p50/p95 of each boot mark and each VMM's peak RSS side by side.
//!
//! Marks measured from outside, for both VMMs: wall time from spawning the VMM
//! to the guest command's first output line, and to the VMM's exit. sbx also
//! reports its internal marks (`sbx boot --json`): VM configured, first vCPU
//! entry and guest agent start, from its own process start.
//!
//! Run it with `cargo xtask bench` (through the nested test host where this
//! host's KVM cannot boot guests).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use images::Images;
use vmm::Mark;

const READY: &str = "sbx-bench-ready";

#[derive(Parser)]
#[command(about = "Boot latency and memory: sbx against QEMU microvm")]
struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[command(flatten)]
    images: Images,
    #[arg(long, default_value_t = 256)]
    mem: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Skip QEMU (when qemu-system-x86_64 is not installed).
    #[arg(long)]
    no_qemu: bool,
}

#[derive(Default)]
struct Samples {
    /// sbx's internal marks (`sbx boot --json`), in `Mark::ALL` order.
    marks: [Vec<f64>; Mark::ALL.len()],
    first_output: Vec<f64>,
    exit: Vec<f64>,
    peak_rss_mib: Vec<f64>,
    overhead_mib: Vec<f64>,
}

struct Run {
    first_output_ms: f64,
    exit_ms: f64,
    max_rss_kib: u64,
    stdout: Vec<String>,
}

/// Spawns `cmd`, timing the first output line containing READY and the exit,
/// and taking the child's peak RSS from wait4(2).
fn timed_run(cmd: &mut Command) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut first_output_ms = None;
    let mut stdout = Vec::new();
    for line in BufReader::new(child.stdout.take().context("no stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        if first_output_ms.is_none() && line.contains(READY) {
            first_output_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        stdout.push(line);
    }
    let mut status = 0;
    // SAFETY: rusage is plain data written by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as i32;
    // SAFETY: waits for our own child; `status` and `usage` are valid pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    if rc != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let Some(first_output_ms) = first_output_ms else {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!(
            "{:?} never printed {READY} (status {status}); stdout: {}; stderr: {err}",
            cmd.get_program(),
            stdout.join(" | ")
        );
    };
    Ok(Run {
        first_output_ms,
        exit_ms,
        max_rss_kib: usage.ru_maxrss as u64,
        stdout,
    })
}

fn cmdline() -> String {
    let mut c = String::from("console=ttyS0 reboot=t panic=-1 quiet");
    if vmm::host::nested_under_tcg() {
        c.push_str(" noxsave");
    }
    c
}

fn bench_sbx(args: &Args) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    for i in 0..args.runs {
        let run = timed_run(
            Command::new(&args.images.sbx)
                .arg("boot")
                .args(args.images.boot_args())
                .args([
                    "--mem",
                    &args.mem.to_string(),
                    "--vcpus",
                    &args.vcpus.to_string(),
                ])
                .args(["--cmdline", &cmdline(), "--json", "--", "echo", READY]),
        )
        .with_context(|| format!("sbx boot {i}"))?;
        let json = run
            .stdout
            .iter()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("sbx printed no JSON")?;
        let doc: serde_json::Value = serde_json::from_str(json)?;
        let mark = |m: &str| doc["marks"][m]["wall_us"].as_f64().map(|us| us / 1000.0);
        for (samples, m) in s.marks.iter_mut().zip(Mark::ALL) {
            samples.extend(mark(m.name()));
        }
        s.first_output.push(run.first_output_ms);
        s.exit.push(run.exit_ms);
        s.peak_rss_mib.push(run.max_rss_kib as f64 / 1024.0);
        if let Some(guest) = doc["guest_resident_kib"].as_u64() {
            s.overhead_mib
                .push((run.max_rss_kib.saturating_sub(guest)) as f64 / 1024.0);
        }
    }
    Ok(s)
}

fn bench_qemu(args: &Args) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    for i in 0..args.runs {
        let run = timed_run(
            Command::new("qemu-system-x86_64")
                .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
                .args(["-smp", &args.vcpus.to_string(), "-m", &args.mem.to_string()])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .args(["-serial", "stdio"])
                .arg("-kernel")
                .arg(&args.images.kernel)
                .arg("-initrd")
                .arg(&args.images.initrd)
                .args(["-append", &format!("{} -- echo {READY}", cmdline())]),
        )
        .with_context(|| format!("qemu microvm boot {i}"))?;
        s.first_output.push(run.first_output_ms);
        s.exit.push(run.exit_ms);
        s.peak_rss_mib.push(run.max_rss_kib as f64 / 1024.0);
    }
    Ok(s)
}

mod images;
mod stats;
use stats::cell;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    vmm::host::probe(std::path::Path::new(vmm::host::DEFAULT_KVM_PATH)).check_bootable()?;
    eprintln!(
        "boot benchmark: {} runs each, {} vCPU(s), {} MiB, kernel {}",
        args.runs,
        args.vcpus,
        args.mem,
        args.images.kernel.display()
    );
    let sbx = bench_sbx(&args)?;
    let qemu = if args.no_qemu {
        Samples::default()
    } else {
        bench_qemu(&args)?
    };

    println!(
        "{:<34} {:>10} {:>10} {:>12} {:>12}",
        "metric (ms, RSS in MiB)", "sbx p50", "sbx p95", "qemu p50", "qemu p95"
    );
    let marks = Mark::ALL
        .iter()
        .zip(&sbx.marks)
        .zip(&qemu.marks)
        .map(|((m, a), b)| (format!("{} (internal)", m.name()), a, b));
    let rows: [(&str, &Vec<f64>, &Vec<f64>); 4] = [
        (
            "guest command output (spawn ->)",
            &sbx.first_output,
            &qemu.first_output,
        ),
        ("VMM exit (spawn ->)", &sbx.exit, &qemu.exit),
        ("peak RSS", &sbx.peak_rss_mib, &qemu.peak_rss_mib),
        (
            "VMM overhead (RSS - guest touched)",
            &sbx.overhead_mib,
            &qemu.overhead_mib,
        ),
    ];
    let rows = marks.chain(rows.map(|(name, a, b)| (name.to_string(), a, b)));
    for (name, a, b) in rows {
        println!(
            "{name:<34} {:>10} {:>10} {:>12} {:>12}",
            cell(a, 50.0),
            cell(a, 95.0),
            cell(b, 50.0),
            cell(b, 95.0)
        );
    }
    Ok(())
}
