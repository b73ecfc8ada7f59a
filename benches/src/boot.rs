//! Boot benchmark: boots the same kernel and initramfs N times with sbx, with
//! QEMU `-M microvm` and, when `SBX_BENCH_FIRECRACKER` names a Firecracker
//! binary the user has, with Firecracker (same memory, vCPUs and command
//! line, same host), alternating between them boot by boot so that drift in
//! the host touches each alike, and prints p50/p95 of each boot mark and each
//! VMM's peak RSS side by side, with sbx's p50 as a ratio of each peer's.
//! The bench never downloads or builds Firecracker.
//!
//! Marks measured from outside, for every VMM: wall time from spawning the VMM
//! to the guest command's first output line, and to the VMM's exit. sbx also
//! reports its internal marks (`sbx boot --json`): VM configured, first vCPU
//! entry and guest agent start, from its own process start.
//!
//! Run it with `cargo xtask bench` (through the nested test host where this
//! host's KVM cannot boot guests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use images::Images;
use vmm::Mark;

const READY: &str = "sbx-bench-ready";

#[derive(Parser)]
#[command(about = "Boot latency and memory: sbx against QEMU microvm and Firecracker")]
struct Args {
    /// Boots per VMM, alternating.
    #[arg(long, default_value_t = 15)]
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
    /// A Firecracker binary to boot alongside; default
    /// `$SBX_BENCH_FIRECRACKER` (neither: Firecracker is left out).
    #[arg(long)]
    firecracker: Option<PathBuf>,
}

/// How long a VMM may run after the guest command's output before it is
/// killed (its exit is then not counted), and in all.
const EXIT_GRACE: Duration = Duration::from_secs(10);
const BOOT_LIMIT: Duration = Duration::from_secs(120);

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
    /// None: killed after the guest's output (see `EXIT_GRACE`).
    exit_ms: Option<f64>,
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
    let pid = child.id() as i32;
    // A VMM that does not end when its guest does (or hangs) is killed, so
    // that one boot cannot stall the bench; `killed` says it was.
    let (done, killed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let watch = |limit: Duration| {
        let (done, killed) = (done.clone(), killed.clone());
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            if !done.load(Ordering::SeqCst) {
                killed.store(true, Ordering::SeqCst);
                // SAFETY: signals our own child, not yet reaped (`done`).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
    };
    watch(BOOT_LIMIT);
    let mut first_output_ms = None;
    let mut stdout = Vec::new();
    for line in BufReader::new(child.stdout.take().context("no stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        if first_output_ms.is_none() && line.contains(READY) {
            first_output_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            watch(EXIT_GRACE);
        }
        stdout.push(line);
    }
    let mut status = 0;
    // SAFETY: rusage is plain data written by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    done.store(true, Ordering::SeqCst);
    let exit_ms = (!killed.load(Ordering::SeqCst)).then(|| start.elapsed().as_secs_f64() * 1000.0);
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

/// A VMM the bench boots.
enum Peer {
    Sbx,
    Qemu,
    Firecracker { bin: PathBuf, config: PathBuf },
}

impl Peer {
    fn name(&self) -> &'static str {
        match self {
            Peer::Sbx => "sbx",
            Peer::Qemu => "qemu",
            Peer::Firecracker { .. } => "firecracker",
        }
    }

    fn command(&self, args: &Args) -> Command {
        match self {
            Peer::Sbx => {
                let mut c = Command::new(&args.images.sbx);
                c.arg("boot")
                    .args(args.images.boot_args())
                    .args(["--mem", &args.mem.to_string()])
                    .args(["--vcpus", &args.vcpus.to_string()])
                    .args(["--cmdline", &cmdline(), "--json", "--", "echo", READY]);
                c
            }
            Peer::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
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
                    .args(["-append", &guest_cmdline()]);
                c
            }
            Peer::Firecracker { bin, config } => {
                let mut c = Command::new(bin);
                c.arg("--no-api").arg("--config-file").arg(config);
                c
            }
        }
    }

    /// One boot, into `s`.
    fn boot(&self, args: &Args, s: &mut Samples) -> anyhow::Result<()> {
        let run = timed_run(&mut self.command(args))?;
        s.first_output.push(run.first_output_ms);
        s.exit.extend(run.exit_ms);
        s.peak_rss_mib.push(run.max_rss_kib as f64 / 1024.0);
        if let Peer::Sbx = self {
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
            if let Some(guest) = doc["guest_resident_kib"].as_u64() {
                s.overhead_mib
                    .push((run.max_rss_kib.saturating_sub(guest)) as f64 / 1024.0);
            }
        }
        Ok(())
    }
}

/// The guest's command line with its command, for VMMs other than sbx.
fn guest_cmdline() -> String {
    format!("{} -- echo {READY}", cmdline())
}

/// Firecracker's configuration for the same VM, written to `dir`.
fn firecracker_config(args: &Args, dir: &Path) -> anyhow::Result<PathBuf> {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": args.images.kernel,
            "initrd_path": args.images.initrd,
            "boot_args": guest_cmdline(),
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": args.vcpus,
            "mem_size_mib": args.mem,
        },
    });
    let path = dir.join("firecracker.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

mod images;
mod stats;
use stats::{cell, percentile};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    vmm::host::probe(std::path::Path::new(vmm::host::DEFAULT_KVM_PATH)).check_bootable()?;
    let dir = tempfile::tempdir()?;
    let mut peers = vec![Peer::Sbx];
    if !args.no_qemu {
        peers.push(Peer::Qemu);
    }
    let firecracker = args
        .firecracker
        .clone()
        .or_else(|| std::env::var_os("SBX_BENCH_FIRECRACKER").map(PathBuf::from));
    if let Some(fc) = firecracker {
        if !fc.is_file() {
            bail!(
                "--firecracker or SBX_BENCH_FIRECRACKER names {}, which is not a file; point it at a Firecracker binary you have, or leave it out",
                fc.display()
            );
        }
        peers.push(Peer::Firecracker {
            bin: fc,
            config: firecracker_config(&args, dir.path())?,
        });
    }
    let names: Vec<&str> = peers.iter().map(Peer::name).collect();
    eprintln!(
        "boot benchmark: {} alternating runs each of {}, {} vCPU(s), {} MiB, kernel {}",
        args.runs,
        names.join(", "),
        args.vcpus,
        args.mem,
        args.images.kernel.display()
    );
    let mut samples: Vec<Samples> = peers.iter().map(|_| Samples::default()).collect();
    for i in 0..args.runs {
        // Each VMM goes first in turn.
        for k in 0..peers.len() {
            let p = (i + k) % peers.len();
            peers[p]
                .boot(&args, &mut samples[p])
                .with_context(|| format!("{} boot {i}", peers[p].name()))?;
        }
    }

    print!("{:<34}", "metric (ms, RSS in MiB)");
    for n in &names {
        print!(" {:>15} {:>15}", format!("{n} p50"), format!("{n} p95"));
    }
    println!();
    let mut rows: Vec<(String, Vec<&Vec<f64>>)> = Mark::ALL
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                format!("{} (internal)", m.name()),
                samples.iter().map(|s| &s.marks[i]).collect(),
            )
        })
        .collect();
    let per = |f: fn(&Samples) -> &Vec<f64>| samples.iter().map(f).collect::<Vec<_>>();
    rows.push((
        "guest command output (spawn ->)".into(),
        per(|s| &s.first_output),
    ));
    rows.push(("VMM exit (spawn ->)".into(), per(|s| &s.exit)));
    rows.push(("peak RSS".into(), per(|s| &s.peak_rss_mib)));
    rows.push((
        "VMM overhead (RSS - guest touched)".into(),
        per(|s| &s.overhead_mib),
    ));
    for (name, cols) in rows {
        print!("{name:<34}");
        for c in cols {
            print!(" {:>15} {:>15}", cell(c, 50.0), cell(c, 95.0));
        }
        println!();
    }
    // The target: sbx at or below each peer (ratio <= 1.0).
    let sbx = percentile(&samples[0].first_output, 50.0);
    for (peer, s) in peers.iter().zip(&samples).skip(1) {
        if let (Some(a), Some(b)) = (sbx, percentile(&s.first_output, 50.0)) {
            println!(
                "sbx / {} p50, guest command output: {:.2}",
                peer.name(),
                a / b
            );
        }
    }
    Ok(())
}
