//! `sbx boot`: boot a kernel and initramfs directly and run one command.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sbx_audit::{AuditLog, Category, Event, Identity};
use sbx_policy::{Decision, Surface};
use vmm::{BootTimings, Console, Mark, VmConfig, VmOutcome};

use crate::{paths, policy_cmd, terminal};

/// How long an audit record may wait in the page cache before it is synced.
pub const AUDIT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Command line every sbx guest gets: serial console, `reboot=k` so that a
/// guest reboot ends the VM, and a panic reboots at once instead of hanging.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

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
    /// Uncompressed ELF kernel (default: $SBX_KERNEL or the one `cargo xtask kernel` built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (default: $SBX_INITRD or the one `cargo xtask rootfs` built).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default base.
    #[arg(long, default_value = BASE_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// KVM device node.
    #[arg(long, default_value = vmm::host::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
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

/// Records a decision and turns a denial into an error naming the rule.
pub fn admit(
    log: &AuditLog,
    surface: Surface,
    action: &str,
    resource: &str,
    d: &Decision<'_>,
) -> anyhow::Result<()> {
    if log.decision(surface, action, resource, d)? {
        return Ok(());
    }
    bail!(
        "policy denies {action} {resource}: {} (rule `{}`, {} layer, {})",
        d.reason,
        d.rule.id,
        d.rule.layer,
        d.rule.location
    )
}

/// Quotes one argument for the kernel command line, which splits on spaces
/// and honours double quotes but has no escape for a quote itself.
fn quote_arg(arg: &str) -> anyhow::Result<String> {
    if arg.contains('"') {
        bail!("guest command argument {arg:?} contains a double quote, which the kernel command line cannot carry");
    }
    if arg.is_empty() || arg.contains(char::is_whitespace) {
        Ok(format!("\"{arg}\""))
    } else {
        Ok(arg.to_string())
    }
}

pub fn guest_cmdline(base: &str, command: &[String]) -> anyhow::Result<String> {
    let mut line = base.trim().to_string();
    if vmm::host::nested_under_tcg() && !line.split_whitespace().any(|w| w == "noxsave") {
        line.push_str(" noxsave");
    }
    if !command.is_empty() {
        line.push_str(" --");
        for a in command {
            line.push(' ');
            line.push_str(&quote_arg(a)?);
        }
    }
    Ok(line)
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

/// Checks that this host can boot guests and that the guest kernel and
/// initramfs exist; returns their paths.
pub fn guest_images(
    kvm: &std::path::Path,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    // The host first: on a host that cannot boot guests, nothing else matters.
    vmm::host::probe(kvm).check_bootable()?;
    let kernel = kernel.unwrap_or_else(paths::default_kernel);
    let initrd = initrd.unwrap_or_else(paths::default_initrd);
    if !kernel.exists() {
        bail!(
            "guest kernel {} not found: build it with `cargo xtask kernel` or pass --kernel",
            kernel.display()
        );
    }
    if !initrd.exists() {
        bail!(
            "guest initramfs {} not found: build it with `cargo xtask rootfs` or pass --initrd",
            initrd.display()
        );
    }
    Ok((kernel, initrd))
}

/// Opens session `name`'s audit log, records its start and asks the policy
/// whether a VM of this size may run (a denial is an error naming the rule).
pub fn open_audit_log(
    name: &str,
    policy: &sbx_policy::Policy,
    vcpus: u32,
    mem_mib: u64,
) -> anyhow::Result<AuditLog> {
    let log_path = paths::audit_dir().join(format!("{name}.jsonl"));
    let log = AuditLog::open(&log_path, Identity::current(name), AUDIT_SYNC_INTERVAL)?;
    let sources: Vec<&str> = policy.sources().iter().map(|s| s.name.as_str()).collect();
    log.append(
        Category::Session,
        Event {
            action: "start".into(),
            resource: name.to_string(),
            details: serde_json::json!({ "vcpus": vcpus, "mem_mib": mem_mib, "policy": sources }),
            ..Event::default()
        },
    )?;
    let size = format!("{vcpus} vCPUs, {mem_mib} MiB");
    admit(
        &log,
        Surface::Limits,
        "start",
        &size,
        &policy.decide_limits(vcpus.into(), mem_mib),
    )?;
    Ok(log)
}

pub fn run(args: Args, start: Instant) -> anyhow::Result<u8> {
    let (kernel, initrd) = guest_images(&args.kvm, args.kernel.clone(), args.initrd.clone())?;
    let policy = args.select.load().context("cannot load the policy")?;
    let session = format!(
        "boot-{}-{}",
        std::process::id(),
        crate::session::state::unix_secs()
    );
    let log = open_audit_log(&session, &policy, args.vcpus, args.mem)?;
    let argv0 = args.command.first().map_or("/bin/sh", String::as_str);
    admit(
        &log,
        Surface::Exec,
        "exec",
        argv0,
        &policy.decide_exec(argv0),
    )?;

    let config = VmConfig {
        kvm_path: args.kvm.clone(),
        kernel,
        initrd: Some(initrd),
        cmdline: guest_cmdline(&args.cmdline, &args.command)?,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        lifetime: policy.lifetime().map(|(d, _)| d),
        vsock: None,
        fs: Vec::new(),
    };
    tracing::debug!(cmdline = %config.cmdline, "booting");

    let output: Box<dyn Write + Send> = match &args.console_log {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create console log {}", path.display()))?,
        ),
        None => Box::new(Unbuffered(std::io::stdout())),
    };
    let interactive = args.command.is_empty();
    let _raw = interactive.then(|| terminal::RawMode::enter(0)).flatten();
    if interactive {
        eprint!("sbx: interactive guest console; `exit` ends the VM\r\n");
    }
    let console = Console {
        output,
        input: interactive.then_some(0),
    };

    let result = vmm::run(&config, console, BootTimings::new(start));
    drop(_raw);
    let ended = match &result {
        Ok(o) => {
            serde_json::json!({ "exit_reason": o.reason.to_string(), "guest_status": o.guest_status })
        }
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    log.append(
        Category::Session,
        Event {
            action: "stop".into(),
            resource: session,
            details: ended,
            ..Event::default()
        },
    )?;
    log.close()?;
    let outcome = result?;
    report(&args, &outcome)?;
    if let (vmm::ExitReason::LifetimeExpired(d), Some((_, rule))) =
        (&outcome.reason, policy.lifetime())
    {
        bail!(
            "the policy ended the session after {} s: rule `{}` ({} layer, {}) limits its lifetime",
            d.as_secs(),
            rule.id,
            rule.layer,
            rule.location
        );
    }
    status(&outcome)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_appended_after_double_dash() {
        let l = guest_cmdline(
            "console=ttyS0",
            &["sh".into(), "-c".into(), "echo hi".into()],
        )
        .unwrap();
        assert!(l.starts_with("console=ttyS0"));
        assert!(l.ends_with(" -- sh -c \"echo hi\""), "{l}");
        assert!(guest_cmdline("x", &["a\"b".into()]).is_err());
        assert!(!guest_cmdline("x", &[]).unwrap().contains("--"));
    }
}
