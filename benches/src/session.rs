//! Session benchmark: exec round trip and vsock throughput through a real
//! session, next to the same figures for a host-side Unix socket.
//!
//! - exec round trip: `sbx exec NAME -- true` as a user runs it (a new
//!   client process each time), and the same request sent straight to the
//!   session's control socket (what the session and guest agent add);
//! - guest to host throughput: N bytes of `sbx exec NAME -- dd` in 64 KiB
//!   and in 4 KiB writes, and of busybox `head -c`, counted on the host;
//!   host to guest: N bytes into `cat > /dev/null`;
//! - baselines: spawning `true` on the host, a one-byte ping-pong over a
//!   Unix socket pair, N bytes through a Unix socket pair, and N bytes
//!   through a pipe inside the guest (what the guest alone allows).
//!
//! With `--seccomp-cost`, instead: what the session process's seccomp
//! filters cost. Two sessions, one started with `--unsafe-no-seccomp`, are
//! measured alternately: start to ready, the exec round trip, guest to
//! host throughput, and creating and deleting files in the shared
//! workspace; each row prints both and their ratio (target: under 1.02).
//!
//! With `--idle N`, instead: what idle sessions cost the host. N sessions
//! are started and left alone; over `--seconds`, the CPU their processes
//! use (all threads, user and system) and their memory (resident, and
//! proportional, which counts pages shared with others once), first
//! running, then paused (`sbx pause`), with how long each pause took.
//!
//! busybox `head` is slow in itself (about 8 MB/s into /dev/null in the
//! nested host, all of it user time), so its row measures the producer as
//! much as sbx; the `dd` rows measure the path through sbx.
//!
//! Run it with `cargo xtask bench session`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use images::Images;
use sbx_protocol::agent::{write_frame, Control, ExecRequest, Frame, FrameIo};

mod images;
mod stats;
use stats::cell;

#[derive(Parser)]
#[command(about = "Exec round trip and vsock throughput of an sbx session")]
struct Args {
    /// Round trips per measurement.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// MiB moved per throughput run.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Measure what the seccomp filters cost instead (see the module).
    #[arg(long)]
    seccomp_cost: bool,
    /// Measure what N idle sessions cost, running and paused, instead.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Seconds each idle measurement lasts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[command(flatten)]
    images: Images,
}

struct Session {
    sbx: PathBuf,
    dir: PathBuf,
    name: &'static str,
}

impl Session {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.sbx);
        c.args(args)
            .env("SBX_RUNTIME_DIR", self.dir.join("run"))
            .env("SBX_STATE_DIR", self.dir.join("state"))
            .current_dir(&self.dir);
        c
    }

    fn ctl(&self) -> PathBuf {
        self.dir.join("run").join(self.name).join("ctl.sock")
    }

    /// `sbx start` of this session with `extra` flags; its duration in ms.
    fn start(&self, images: &Images, extra: &[&str]) -> anyhow::Result<f64> {
        let t = Instant::now();
        let start = self
            .cmd(&["start", "--name", self.name])
            .args(images.boot_args())
            .args(extra)
            .output()
            .context("cannot run sbx start")?;
        if !start.status.success() {
            bail!(
                "sbx start failed: {}",
                String::from_utf8_lossy(&start.stderr)
            );
        }
        Ok(ms_since(t))
    }

    /// `sbx exec NAME -- sh -c SCRIPT`, which must succeed; its duration.
    fn sh(&self, script: &str) -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = self
            .cmd(&["exec", self.name, "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("{script}: {st}");
        }
        Ok(ms_since(t))
    }

    fn remove(&self) {
        let _ = self.cmd(&["rm", "--force", self.name]).output();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.remove();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// One exec of `true` over the control socket, without a client process.
fn raw_exec(ctl: &Path) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(ctl)?;
    let req = ExecRequest {
        id: 1,
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        user: None,
        pty: None,
    };
    write_frame(&mut s, &Frame::Control(Control::Exec(req)))?;
    let mut frames = FrameIo::new(s);
    while let Some(f) = frames.read_frame()? {
        if let Frame::Control(Control::Exited { code, .. }) = f {
            if code != Some(0) {
                bail!("true exited with {code:?}");
            }
            return Ok(());
        }
    }
    bail!("the session closed the connection before `true` exited")
}

fn mb_per_s(bytes: u64, t: Instant) -> f64 {
    bytes as f64 / 1e6 / t.elapsed().as_secs_f64()
}

/// `sbx exec` of a command that writes `bytes` to its stdout, read on the
/// host: guest to host throughput, in MB/s.
fn guest_to_host(s: &Session, argv: &[&str], bytes: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut child = s
        .cmd(&["exec", s.name, "--"])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    child.wait()?;
    if got != bytes {
        bail!(
            "guest to host ({}): got {got} bytes of {bytes}",
            argv.join(" ")
        );
    }
    Ok(mb_per_s(got, t))
}

fn unix_throughput(bytes: u64) -> anyhow::Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let t = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            a.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = b.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    writer.join().expect("writer thread")?;
    Ok(mb_per_s(got, t))
}

fn unix_ping_pong(runs: usize) -> anyhow::Result<Vec<f64>> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() {
            if b.write_all(&byte).is_err() {
                return;
            }
        }
    });
    let mut out = Vec::with_capacity(runs);
    let mut byte = [1u8; 1];
    for _ in 0..runs {
        let t = Instant::now();
        a.write_all(&byte)?;
        a.read_exact(&mut byte)?;
        out.push(ms_since(t));
    }
    drop(a);
    let _ = echo.join();
    Ok(out)
}

fn row(what: &str, v: &[f64]) {
    println!("{what:<46} {:>10} {:>10}", cell(v, 50.0), cell(v, 95.0));
}

fn session(args: &Args, name: &'static str) -> anyhow::Result<Session> {
    let dir = std::env::temp_dir().join(format!("sbx-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(Session {
        sbx: args.images.sbx.clone(),
        dir,
        name,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    vmm::host::probe(Path::new(vmm::host::DEFAULT_KVM_PATH)).check_bootable()?;
    if args.seccomp_cost {
        return seccomp_cost(&args);
    }
    if let Some(n) = args.idle {
        return idle(&args, n);
    }
    let s = session(&args, "bench")?;
    s.start(&args.images, &[])?;

    eprintln!("exec round trips ({} each)...", args.runs);
    let mut cli = Vec::new();
    let mut raw = Vec::new();
    let mut spawn = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let st = s
            .cmd(&["exec", s.name, "--", "true"])
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("sbx exec bench -- true failed: {st}");
        }
        cli.push(ms_since(t));
        let t = Instant::now();
        raw_exec(&s.ctl())?;
        raw.push(ms_since(t));
        let t = Instant::now();
        Command::new("true").status()?;
        spawn.push(ms_since(t));
    }
    let ping = unix_ping_pong(args.runs.max(1000))?;

    let bytes = args.mib << 20;
    eprintln!("throughput ({} MiB each way)...", args.mib);
    let dd = |bs: u64| format!("dd if=/dev/zero bs={bs} count={} 2>/dev/null", bytes / bs);
    let g2h_64k = guest_to_host(&s, &["sh", "-c", &dd(64 << 10)], bytes)?;
    let g2h_4k = guest_to_host(&s, &["sh", "-c", &dd(4 << 10)], bytes)?;
    let g2h_head = guest_to_host(&s, &["head", "-c", &bytes.to_string(), "/dev/zero"], bytes)?;
    // The guest alone: the same bytes through a pipe inside the guest.
    let t = Instant::now();
    let st = s
        .cmd(&["exec", s.name, "--", "sh", "-c"])
        .arg(format!("{} | cat > /dev/null", dd(64 << 10)))
        .stdin(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("the in-guest pipe failed: {st}");
    }
    let in_guest = mb_per_s(bytes, t);

    let t = Instant::now();
    let mut child = s
        .cmd(&["exec", s.name, "--", "sh", "-c", "cat > /dev/null"])
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut input = child.stdin.take().expect("piped stdin");
        let chunk = vec![0u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            input.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    if !child.wait()?.success() {
        bail!("host to guest: cat failed");
    }
    let h2g = mb_per_s(bytes, t);
    let unix = unix_throughput(bytes)?;

    println!();
    println!("{:<46} {:>10} {:>10}", "round trip (ms)", "p50", "p95");
    row("sbx exec -- true (new client process)", &cli);
    row("exec `true` over the control socket", &raw);
    row("host: spawn `true` (baseline)", &spawn);
    row("host: Unix socket 1-byte ping-pong (baseline)", &ping);
    println!();
    println!("{:<46} {:>10}", "throughput", "MB/s");
    println!(
        "{:<46} {:>10.1}",
        "guest to host, 64 KiB writes (dd)", g2h_64k
    );
    println!(
        "{:<46} {:>10.1}",
        "guest to host, 4 KiB writes (dd)", g2h_4k
    );
    println!(
        "{:<46} {:>10.1}",
        "guest to host, busybox head -c", g2h_head
    );
    println!(
        "{:<46} {:>10.1}",
        "guest: pipe inside the guest (baseline)", in_guest
    );
    println!("{:<46} {:>10.1}", "host to guest (sbx exec stdin)", h2g);
    println!("{:<46} {:>10.1}", "host: Unix socket pair (baseline)", unix);
    Ok(())
}

/// Both sessions' samples of one measurement, alternating which goes first.
struct Pair {
    on: Vec<f64>,
    off: Vec<f64>,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            on: Vec::new(),
            off: Vec::new(),
        }
    }

    fn push(&mut self, filtered: bool, v: f64) {
        if filtered {
            self.on.push(v)
        } else {
            self.off.push(v)
        }
    }

    fn print(&self, what: &str) {
        let p50 = |v: &[f64]| stats::percentile(v, 50.0).unwrap_or(f64::NAN);
        let (on, off) = (p50(&self.on), p50(&self.off));
        println!("{what:<40} {:>10.2} {:>10.2} {:>8.3}", on, off, on / off);
    }
}

/// `--seccomp-cost`: the same measurements on a filtered and an unfiltered
/// session, alternately (see the module).
fn seccomp_cost(args: &Args) -> anyhow::Result<()> {
    let on = session(args, "filtered")?;
    let off = session(args, "unfiltered")?;
    let runs = args.runs.max(4);
    let (mut start, mut exec, mut g2h, mut files) =
        (Pair::new(), Pair::new(), Pair::new(), Pair::new());
    let alternate = |round: usize| {
        if round.is_multiple_of(2) {
            [(&on, true), (&off, false)]
        } else {
            [(&off, false), (&on, true)]
        }
    };
    eprintln!("starts (3 each)...");
    for round in 0..3 {
        for (s, filtered) in alternate(round) {
            let flags: &[&str] = if filtered {
                &[]
            } else {
                &["--unsafe-no-seccomp"]
            };
            start.push(filtered, s.start(&args.images, flags)?);
            if round < 2 {
                s.remove();
            }
        }
    }
    let bytes = args.mib.min(64) << 20;
    let dd = format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null", bytes >> 16);
    let churn = "mkdir -p /workspace/churn && cd /workspace/churn && i=0; \
                 while [ $i -lt 300 ]; do echo x > f$i; i=$((i+1)); done; rm -f f*";
    eprintln!("exec, throughput and files ({runs} rounds)...");
    for round in 0..runs {
        for (s, filtered) in alternate(round) {
            let t = Instant::now();
            raw_exec(&s.ctl())?;
            exec.push(filtered, ms_since(t));
            g2h.push(filtered, guest_to_host(s, &["sh", "-c", &dd], bytes)?);
            files.push(filtered, s.sh(churn)?);
        }
    }
    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>8}",
        "p50", "filtered", "off", "ratio"
    );
    start.print("sbx start to ready (ms)");
    exec.print("exec `true`, control socket (ms)");
    g2h.print(&format!(
        "guest to host, {} MiB dd 64 KiB (MB/s)",
        bytes >> 20
    ));
    files.print("create+delete 300 files in /workspace (ms)");
    Ok(())
}

impl Session {
    /// The session process, from its `session.json`.
    fn pid(&self) -> anyhow::Result<u32> {
        let path = self.dir.join("run").join(self.name).join("session.json");
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        info["pid"]
            .as_u64()
            .map(|p| p as u32)
            .with_context(|| format!("no pid in {}", path.display()))
    }
}

/// CPU a process has used, all threads, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("a /proc stat line")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// A process's resident and proportional memory, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((field("Rss:"), field("Pss:")))
}

/// Per session, over `seconds`: CPU in percent of one core, resident and
/// proportional MiB.
fn idle_costs(pids: &[u32], seconds: u64) -> anyhow::Result<(f64, f64, f64)> {
    let before: Vec<f64> = pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    let mut cpu = 0.0;
    let (mut rss, mut pss) = (0.0, 0.0);
    for (pid, b) in pids.iter().zip(before) {
        cpu += cpu_seconds(*pid)? - b;
        let (r, p) = memory_mib(*pid)?;
        rss += r;
        pss += p;
    }
    let n = pids.len() as f64;
    Ok((100.0 * cpu / seconds as f64 / n, rss / n, pss / n))
}

/// `--idle N`: N idle sessions, running and then paused (see the module).
fn idle(args: &Args, n: usize) -> anyhow::Result<()> {
    let sessions: Vec<Session> = (0..n)
        .map(|i| session(args, Box::leak(format!("idle{i}").into_boxed_str())))
        .collect::<Result<_, _>>()?;
    eprintln!("starting {n} sessions...");
    for s in &sessions {
        s.start(&args.images, &[])?;
    }
    let pids: Vec<u32> = sessions
        .iter()
        .map(Session::pid)
        .collect::<Result<_, _>>()?;
    // Let the guests finish booting their userland before measuring.
    std::thread::sleep(std::time::Duration::from_secs(5));
    eprintln!("running, idle, for {} s...", args.seconds);
    let running = idle_costs(&pids, args.seconds)?;
    let mut pauses: Vec<f64> = Vec::new();
    for s in &sessions {
        let t = Instant::now();
        let out = s.cmd(&["pause", s.name]).output()?;
        if !out.status.success() {
            bail!("sbx pause failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        pauses.push(ms_since(t));
    }
    eprintln!("paused for {} s...", args.seconds);
    let paused = idle_costs(&pids, args.seconds)?;
    for s in &sessions {
        let _ = s.cmd(&["resume", s.name]).output();
    }
    println!();
    println!("{n} idle sessions, per session, over {} s", args.seconds);
    println!("{:<40} {:>10} {:>10}", "", "running", "paused");
    let row = |what: &str, a: f64, b: f64| println!("{what:<40} {a:>10.2} {b:>10.2}");
    row("host CPU (% of one core)", running.0, paused.0);
    row("resident memory (MiB)", running.1, paused.1);
    row("proportional memory (MiB)", running.2, paused.2);
    println!(
        "{:<40} p50 {} p95 {}",
        "sbx pause, whole command (ms)",
        cell(&pauses, 50.0),
        cell(&pauses, 95.0)
    );
    Ok(())
}
