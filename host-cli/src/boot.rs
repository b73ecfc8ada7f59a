//! `sbx boot`: boot a kernel and initramfs directly and run one command.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use sandbox::session::{Front, OneCommand};
use sandbox::terminal::RawMode;
use sandbox::SessionSpec;
use sbx_protocol::cmdline;
use vmm::{BootTimings, Console, Mark, VmOutcome};

use crate::policy_cmd;
use crate::session::MachineArgs;

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx boot -- uname -a                 run one command, exit with its status
  sbx boot --vcpus 4 --mem 1024 -- nproc
  sbx boot                             interactive shell on the guest console
  sbx boot --timings -- true           print boot marks (wall and CPU time)
  sbx boot --json --console-log /dev/null -- true

The policy (see `sbx policy show`) must allow the vCPUs, memory and command;
each decision and the guest's exit are recorded in the session's audit log
(`sbx events`).

Exit status: the guest command's own status; 125 when sbx itself failed
(bad input, no usable KVM, the guest crashed, the policy refused); 127 when
the guest could not start the command.")]
pub struct Args {
    #[command(flatten)]
    machine: MachineArgs,
    /// Kernel command line, replacing the default base.
    #[arg(long, default_value = cmdline::BASE)]
    cmdline: String,
    /// Write the guest console to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Print boot marks (wall and CPU time since process start) to standard error.
    #[arg(long)]
    timings: bool,
    /// Print the outcome and boot marks as one JSON object on standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    select: policy_cmd::Select,
    /// Command to run in the guest (an interactive shell when omitted).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Writes every byte straight through, so that prompts without a newline show up.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Where the guest console goes: `--console-log`, or this terminal
/// (raw, typing into the guest, when there is no command).
fn open_console(args: &Args, raw: &mut Option<RawMode>) -> sandbox::Result<Console> {
    let output: Box<dyn Write + Send> = match &args.console_log {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Box::new(f),
            Err(error) => {
                return Err(sandbox::Error::Io {
                    what: format!("cannot create console log {}", path.display()),
                    error,
                })
            }
        },
        None => Box::new(Unbuffered(std::io::stdout())),
    };
    let interactive = args.command.is_empty();
    *raw = interactive.then(|| RawMode::enter(0)).flatten();
    if interactive {
        eprint!("sbx: interactive guest console; `exit` ends the VM\r\n");
    }
    Ok(Console {
        output,
        input: interactive.then_some(0),
    })
}

pub fn run(args: Args, start: Instant) -> anyhow::Result<u8> {
    let name = format!("boot-{}-{}", std::process::id(), sandbox::sys::unix_secs());
    let mut spec = SessionSpec::new(&name, &args.select.selection())?;
    spec.vm = args.machine.vm_spec();
    let mut raw = None;
    let result = sandbox::session::run(
        &spec,
        Front::Command(OneCommand {
            command: args.command.clone(),
            cmdline: args.cmdline.clone(),
            console: Box::new(|| open_console(&args, &mut raw)),
            timings: BootTimings::new(start),
        }),
    );
    drop(raw);
    let ended = result?;
    report(&args, &ended.outcome)?;
    if let Some(why) = ended.expired {
        bail!("{why}");
    }
    status(&ended.outcome)
}

fn status(outcome: &VmOutcome) -> anyhow::Result<u8> {
    match (outcome.reason.is_clean(), outcome.guest_status) {
        (true, Some(code)) => Ok(code),
        (true, None) => bail!(
            "{} before the guest agent reported an exit status (did the agent start? check the console output)",
            outcome.reason
        ),
        (false, _) => bail!("the VM failed: {}", outcome.reason),
    }
}

fn report(args: &Args, outcome: &VmOutcome) -> anyhow::Result<()> {
    if args.timings {
        let mut err = std::io::stderr().lock();
        writeln!(err, "{:<20} {:>12} {:>12}", "mark", "wall ms", "cpu ms")?;
        for mark in Mark::ALL {
            match outcome.timings.get(mark) {
                Some(t) => writeln!(
                    err,
                    "{:<20} {:>12.3} {:>12.3}",
                    mark.name(),
                    t.wall_us as f64 / 1000.0,
                    t.cpu_us as f64 / 1000.0
                )?,
                None => writeln!(err, "{:<20} {:>12} {:>12}", mark.name(), "-", "-")?,
            }
        }
    }
    if args.json {
        let marks: serde_json::Map<String, serde_json::Value> = outcome
            .timings
            .marks
            .iter()
            .map(|(m, t)| {
                (
                    m.name().to_string(),
                    serde_json::json!({ "wall_us": t.wall_us, "cpu_us": t.cpu_us }),
                )
            })
            .collect();
        let doc = serde_json::json!({
            "exit_reason": outcome.reason.to_string(),
            "clean": outcome.reason.is_clean(),
            "guest_status": outcome.guest_status,
            "marks": marks,
            "peak_rss_kib": peak_rss_kib(),
            "guest_resident_kib": outcome.guest_resident_bytes / 1024,
        });
        println!("{doc}");
    }
    Ok(())
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
