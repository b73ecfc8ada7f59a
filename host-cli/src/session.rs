//! Session commands: each parses its flags, builds a spec or a request,
//! and calls the `sandbox` library, which starts the session process
//! (`sbx __session`), talks to it, and reads and removes its directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use sandbox::attach::{self, Request};
use sandbox::state::{self, Dir, Phase};
use sandbox::{launch, MountSpec, Pin, SessionSpec, VmSpec};
use vmm::devices::virtio::fs::FsCache;

use crate::policy_cmd;

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx start                      start a session with a generated name (printed)
  sbx start --name s1 --vcpus 2 --mem 1024
  sbx exec s1 -- uname -a

The session runs in the background until `sbx stop`. The policy (see `sbx
policy show`) must allow its vCPUs and memory; every decision and guest
event goes to its audit log (`sbx events NAME`).

`sbx start NAME` on a stopped session starts it again as it was first
started; booted from an image (--image), it keeps its disk, so what was
written in it is still there. `sbx rm NAME` deletes the session and its disk.")]
pub struct StartArgs {
    /// Session name (letters, digits, '-', '_', '.'); default: s1, s2, ...
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
}

/// The VM itself: its size, kernel, initramfs and KVM device.
#[derive(clap::Args, Clone)]
pub struct MachineArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Uncompressed ELF kernel (default: $SBX_KERNEL or the one `cargo xtask kernel` built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (default: $SBX_INITRD or the one `cargo xtask rootfs` built).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = vmm::host::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
}

impl MachineArgs {
    pub fn vm_spec(&self) -> VmSpec {
        let defaults = VmSpec::default();
        VmSpec {
            vcpus: self.vcpus,
            mem_mib: self.mem,
            kvm: self.kvm.clone(),
            kernel: self.kernel.clone().unwrap_or(defaults.kernel),
            initrd: self.initrd.clone().unwrap_or(defaults.initrd),
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct VmArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Share a host directory at a guest path, read-only unless `:rw`
    /// (repeatable). The policy's deny rules apply inside it.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro|rw]")]
    mounts: Vec<String>,
    /// Do not share the current directory (read-write at /workspace, where
    /// commands then start).
    #[arg(long)]
    no_workspace: bool,
    /// How /workspace is made: `shared` (the current directory itself,
    /// read-write over virtio-fs: edits show on both sides at once) or
    /// `clone` (the current git repository cloned onto the session's own
    /// disk: git, npm and builds at local-disk speed; bring commits back
    /// with `sbx fetch NAME`).
    #[arg(long, value_name = "MODE", default_value = "shared", value_parser = ["shared", "clone"])]
    workspace: String,
    /// How long the guest may trust what it learnt about shared files:
    /// auto (names, attributes and data for 60 s, and the host watched: a
    /// host edit reaches the guest in about 50 ms, repeated scans such as
    /// `git status` run near host speed; the default), always (the same
    /// without the watch: host edits can take a minute to show; for
    /// directories only the guest changes), never (nothing cached: host
    /// edits show at once, but every access asks the host: slowest).
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "never", "always"])]
    fs_cache: String,
    /// How much the guest may add to files in its shares, in all (512M,
    /// 10G); past it, writes that grow a file fail with "No space left on
    /// device". Deleting does not give space back. Default: no quota.
    #[arg(long, value_name = "SIZE")]
    share_quota: Option<String>,
    /// Also trust this CA (PEM) for the egress proxy's TLS to upstream
    /// hosts, besides the system roots (a corporate proxy's CA, a local
    /// test server's). Repeatable.
    #[arg(long, value_name = "PEM")]
    upstream_ca: Vec<PathBuf>,
    /// Have the egress proxy resolve NAME to ADDR, like curl's --resolve
    /// (repeatable). The policy still checks the address: a private or
    /// loopback one needs a network rule that names it.
    #[arg(long, value_name = "NAME:ADDR")]
    resolve: Vec<String>,
    /// Boot from this image (see `sbx image ls`; `NAME@sha256:…` pins its
    /// digest) instead of the built-in initramfs. Writes go to the
    /// session's own disk, joined over the read-only image.
    #[arg(long, value_name = "IMAGE", conflicts_with = "template")]
    image: Option<String>,
    /// Run an agent template (`sbx template ls`): its image (built on first
    /// use), its user, environment and policy rules. Commands run as the
    /// template's user unless --user says otherwise.
    #[arg(long, value_name = "TEMPLATE")]
    template: Option<String>,
    /// Size of the session's disk with --image or --template (sparse: only
    /// what the guest writes takes host space; past it the guest gets "No
    /// space left on device"). Default: 8G.
    #[arg(long, value_name = "SIZE")]
    disk: Option<String>,
    /// MCP servers for the session's gateway: a file of `[[mcp.server]]`
    /// tables (repeatable). Default: ~/.config/sbx/mcp.toml and
    /// ./.sbx/mcp.toml when they exist. See `sbx mcp --help`.
    #[arg(long = "mcp", value_name = "FILE")]
    mcp: Vec<PathBuf>,
    /// No MCP gateway, whatever the config files declare.
    #[arg(long, conflicts_with = "mcp")]
    no_mcp: bool,
    /// UNSAFE: run the session process without its seccomp filters, so a
    /// bug in a device parser gives a hostile guest every system call. For
    /// telling whether a failure is a filter's; the audit log records it.
    #[arg(long)]
    unsafe_no_seccomp: bool,
    #[command(flatten)]
    select: policy_cmd::Select,
}

impl VmArgs {
    /// The session these flags describe (`launch::start` checks it).
    fn spec(&self, name: &str) -> anyhow::Result<SessionSpec> {
        let mut mounts = Vec::new();
        let clone = !self.no_workspace && self.workspace == "clone";
        if clone {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            mounts.push(MountSpec {
                host: sandbox::workspace::repository(&cwd)?,
                guest: sandbox::workspace::ORIGIN.into(),
                read_only: true,
            });
        } else if !self.no_workspace {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            mounts.push(MountSpec::workspace(&cwd)?);
        }
        for m in &self.mounts {
            mounts.push(MountSpec::parse(m)?);
        }
        let mut spec = SessionSpec::new(name, &self.select.selection())?;
        spec.vm = self.machine.vm_spec();
        spec.mounts = mounts;
        spec.clone_workspace = clone;
        spec.unsafe_no_seccomp = self.unsafe_no_seccomp;
        spec.fs_cache = FsCache::parse(&self.fs_cache)
            .with_context(|| format!("--fs-cache {}: not auto, never or always", self.fs_cache))?;
        spec.share_quota = match &self.share_quota {
            Some(q) => Some(sandbox::spec::parse_size(q).context("--share-quota")?),
            None => None,
        };
        for ca in &self.upstream_ca {
            let ca = std::fs::canonicalize(ca)
                .with_context(|| format!("--upstream-ca {}: cannot read it", ca.display()))?;
            spec.egress.upstream_ca.push(ca);
        }
        for r in &self.resolve {
            spec.egress.resolve.push(Pin::parse(r)?);
        }
        if !self.no_mcp {
            spec.mcp = sandbox::mcp::servers(&self.mcp)?;
        }
        let size = match &self.disk {
            Some(d) => Some(sandbox::spec::parse_size(d).context("--disk")?),
            None => None,
        };
        if let Some(image) = &self.image {
            spec.root = Some(sandbox::disks::resolve(image, size)?);
        } else if let Some(name) = &self.template {
            let t = self.template()?.context("no template")?;
            let sbx = std::env::current_exe().context("cannot find the sbx binary")?;
            let built = sbx_template::build(&t, &sbx, &crate::image_cmd::progress)
                .with_context(|| format!("cannot build template {name}"))?;
            spec.root = Some(sandbox::disks::resolve(&built.name, size)?);
            spec.user = t.user.clone();
            spec.policy.selection.texts.extend(t.policy_text());
        } else if size.is_some() {
            bail!(
                "--disk sizes the disk of a session from an image: give --image or --template too"
            );
        }
        // A policy that does not load (a typo, a tampered or expired
        // bundle) is said here, before any process starts.
        spec.policy.load()?;
        Ok(spec)
    }

    /// The template --template names, if any.
    fn template(&self) -> anyhow::Result<Option<sbx_template::Template>> {
        Ok(match &self.template {
            Some(name) => Some(sbx_template::find(name)?),
            None => None,
        })
    }
}

#[derive(clap::Args)]
pub struct CommandArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long, short, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short, value_name = "DIR")]
    workdir: Option<String>,
    /// User (name or uid) to run as; root by default.
    #[arg(long, short)]
    user: Option<String>,
    /// Run on a terminal (PTY) in the guest, as `sbx shell` does.
    #[arg(long, short)]
    tty: bool,
}

impl CommandArgs {
    fn request(&self, argv: Vec<String>) -> anyhow::Result<Request> {
        let env = self
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => bail!("--env {kv:?} is not NAME=VALUE"),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Request {
            argv,
            env,
            cwd: self.workdir.clone(),
            user: self.user.clone(),
            tty: self.tty,
        })
    }
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx exec s1 -- ls -la /
  echo hi | sbx exec s1 -- tr a-z A-Z
  sbx exec s1 -e FOO=bar -w /tmp -- sh -c 'echo $FOO; pwd'

Standard input, output and error pass through unchanged, and the exit status
is the command's own (125: sbx failed; 126: refused or not runnable; 127: not
found in the guest).")]
pub struct ExecArgs {
    /// The session to run in.
    name: String,
    #[command(flatten)]
    opts: CommandArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
#[command(after_help = "\
Example:
  sbx shell s1             a shell on a PTY; `exit` or Ctrl-D leaves it

Window size changes follow the terminal and Ctrl-C goes to the guest.")]
pub struct ShellArgs {
    name: String,
    /// User (name or uid) to log in as; root by default.
    #[arg(long, short)]
    user: Option<String>,
    /// Shell to run.
    #[arg(long, default_value = "/bin/sh")]
    shell: String,
}

#[derive(clap::Args)]
#[command(after_help = "\
Example:
  sbx start --name w --workspace clone --image base
  sbx exec w -- sh -c 'echo fix >> README.md && git commit -qam fix'
  sbx fetch w                     # the branches arrive as sbx/w/<branch>
  git merge sbx/w/main")]
pub struct FetchArgs {
    /// A session started with --workspace clone.
    name: String,
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// One JSON object per session, in an array.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct StopArgs {
    name: String,
    /// Seconds to wait for a graceful stop before killing the session.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

#[derive(clap::Args)]
#[command(after_help = "\
A paused session keeps its memory, processes and open connections; its
vCPUs use no host CPU and its commands do not run until it is resumed.
`sbx exec` into a paused session is refused; `sbx stop` resumes it first.

Examples:
  sbx pause agent1
  sbx resume agent1 --json")]
pub struct PauseArgs {
    name: String,
    /// Print the result as JSON: name, state and how long it took.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Sessions to remove.
    #[arg(required = true)]
    names: Vec<String>,
    /// Stop running sessions first instead of refusing.
    #[arg(long, short)]
    force: bool,
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sbx run -- uname -a
  sbx run --vcpus 2 -- sh -c 'echo out; echo err >&2; exit 7'   # exits 7

Starts a session, runs the command in it, stops and removes the session,
and exits with the command's status.")]
pub struct RunArgs {
    /// Session name while it runs (default: run-PID-TIME).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    opts: CommandArgs,
    /// The command and its arguments (with --template, default: the
    /// template's command, on a terminal when this is one).
    #[arg(last = true)]
    command: Vec<String>,
}

/// The hidden `sbx __session NAME`: the session process `sbx start` launches.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The session, whose directory holds its spec.
    name: String,
    /// Descriptor of the pipe on which to report readiness to `sbx start`.
    #[arg(long)]
    ready_fd: Option<i32>,
}

pub fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    // SAFETY: the descriptor was set up for us by `sbx start` and is ours alone.
    let ready = unsafe { sandbox::session::Ready::from_fd(a.ready_fd) };
    sandbox::session::serve(&a.name, ready)?;
    Ok(0)
}

/// Starts a session and returns once its guest agent is ready.
fn start_session(spec: &SessionSpec, quiet: bool) -> anyhow::Result<Dir> {
    let sbx = std::env::current_exe().context("cannot find the sbx binary")?;
    let started = std::time::Instant::now();
    let dir = launch::start(spec, &sbx, || {
        if !quiet {
            eprintln!(
                "sbx: starting session `{}` ({} vCPU, {} MiB)...",
                spec.name, spec.vm.vcpus, spec.vm.mem_mib
            );
        }
    })?;
    if !quiet {
        eprintln!(
            "sbx: session `{}` is ready ({:.1} s)",
            spec.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(dir)
}

pub fn start(a: StartArgs) -> anyhow::Result<u8> {
    if let Some(name) = &a.name {
        if let Ok((_, info)) = Dir::existing(name) {
            if !info.state.is_alive() {
                return restart(name);
            }
        }
    }
    let name = a.name.clone().unwrap_or_else(launch::first_free_name);
    start_session(&a.vm.spec(&name)?, false)?;
    println!("{name}");
    Ok(0)
}

/// `sbx start NAME` on a stopped session: the same session again.
fn restart(name: &str) -> anyhow::Result<u8> {
    let sbx = std::env::current_exe().context("cannot find the sbx binary")?;
    let started = std::time::Instant::now();
    launch::restart(name, &sbx, || {
        eprintln!("sbx: starting stopped session `{name}` again, as it was started (with its disk, if it has one)...");
    })?;
    eprintln!(
        "sbx: session `{name}` is ready ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{name}");
    Ok(0)
}

pub fn fetch(a: FetchArgs) -> anyhow::Result<u8> {
    let dir = Dir::running(&a.name)?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let repo = sandbox::workspace::repository(&cwd)?;
    let refs = sandbox::workspace::fetch(&dir, &repo)?;
    for r in &refs {
        println!("{r}");
    }
    eprintln!(
        "sbx: fetched {} branch(es) of session `{}` into {}; merge one with `git merge {}`",
        refs.len(),
        a.name,
        repo.display(),
        refs.first().map_or("sbx/NAME/BRANCH", String::as_str)
    );
    Ok(0)
}

pub fn exec(a: ExecArgs) -> anyhow::Result<u8> {
    let dir = Dir::running(&a.name)?;
    Ok(attach::exec(&dir, a.opts.request(a.command)?)?)
}

pub fn shell(a: ShellArgs) -> anyhow::Result<u8> {
    let dir = Dir::running(&a.name)?;
    let req = Request {
        argv: vec![a.shell],
        env: Vec::new(),
        cwd: None,
        user: a.user,
        tty: true,
    };
    Ok(attach::exec(&dir, req)?)
}

fn uptime(info: &state::Info) -> String {
    if !info.state.is_alive() {
        return "-".into();
    }
    let s = sandbox::sys::unix_secs().saturating_sub(info.started);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// A session's image (from its spec) and the host bytes its disk takes.
fn image_and_disk(dir: &Dir) -> (Option<String>, Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    let image = SessionSpec::read(&dir.spec_path())
        .ok()
        .and_then(|s| s.root)
        .map(|r| r.image);
    let disk = std::fs::metadata(sandbox::disks::layer_path(&dir.name))
        .ok()
        .map(|m| m.blocks() * 512);
    (image, disk)
}

pub fn ls(a: LsArgs) -> anyhow::Result<u8> {
    let sessions: Vec<(state::Info, Option<String>, Option<u64>)> = state::all()
        .iter()
        .filter_map(|d| {
            let (image, disk) = image_and_disk(d);
            d.status().ok().map(|i| (i, image, disk))
        })
        .collect();
    if a.json {
        let docs: Vec<serde_json::Value> = sessions
            .iter()
            .map(|(i, image, disk)| {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                v["uptime_s"] = if i.state.is_alive() {
                    sandbox::sys::unix_secs().saturating_sub(i.started).into()
                } else {
                    serde_json::Value::Null
                };
                v["image"] = image.clone().into();
                v["disk_bytes"] = (*disk).into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<9} {:>8} {:>5} {:>8} {:>8}  {:<16} {:>9}",
        "NAME", "STATE", "UPTIME", "VCPUS", "MEM", "PID", "IMAGE", "DISK"
    );
    for (i, image, disk) in &sessions {
        println!(
            "{:<20} {:<9} {:>8} {:>5} {:>7}M {:>8}  {:<16} {:>9}",
            i.name,
            i.state,
            uptime(i),
            i.vcpus,
            i.mem_mib,
            i.pid,
            image.as_deref().unwrap_or("(initramfs)"),
            disk.map_or("-".into(), sbx_image::store::human)
        );
    }
    Ok(0)
}

pub fn stop(a: StopArgs) -> anyhow::Result<u8> {
    let (dir, info) = Dir::existing(&a.name)?;
    if !info.state.is_alive() {
        bail!("session `{}` is not running (it is {})", a.name, info.state);
    }
    let how = launch::stop(&dir, info.pid, Duration::from_secs(a.timeout));
    eprintln!("sbx: session `{}` {how}", a.name);
    Ok(0)
}

pub fn pause(a: PauseArgs, pause: bool) -> anyhow::Result<u8> {
    let (dir, info) = Dir::existing(&a.name)?;
    if !matches!(info.state, Phase::Running | Phase::Paused) {
        bail!(
            "session `{}` is {}: only a running session can be paused or resumed",
            a.name,
            info.state
        );
    }
    let (want, verb) = if pause {
        (Phase::Paused, "paused")
    } else {
        (Phase::Running, "resumed")
    };
    let already = info.state == want;
    let started = std::time::Instant::now();
    if !already {
        launch::pause(&dir, pause)?;
    }
    let took_ms = started.elapsed().as_secs_f64() * 1000.0;
    if a.json {
        let doc = serde_json::json!({
            "name": a.name,
            "state": want.to_string(),
            "took_ms": took_ms,
        });
        println!("{doc}");
    } else if already {
        eprintln!("sbx: session `{}` is already {want}", a.name);
    } else {
        eprintln!("sbx: session `{}` {verb} in {took_ms:.0} ms", a.name);
    }
    Ok(0)
}

pub fn rm(a: RmArgs) -> anyhow::Result<u8> {
    for name in &a.names {
        let (dir, info) = Dir::existing(name)?;
        if info.state.is_alive() {
            if !a.force {
                bail!("session `{name}` is running; `sbx stop {name}` first, or `sbx rm --force {name}`");
            }
            launch::stop(&dir, info.pid, Duration::from_secs(10));
        }
        launch::remove(&dir)?;
        eprintln!("sbx: removed session `{name}`");
    }
    Ok(0)
}

pub fn run(a: RunArgs) -> anyhow::Result<u8> {
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("run-{}-{}", std::process::id(), sandbox::sys::unix_secs()));
    let mut command = a.command.clone();
    let mut opts = a.opts;
    if command.is_empty() {
        match a.vm.template()? {
            Some(t) if !t.command.is_empty() => {
                command = t.command.clone();
                // SAFETY: isatty only inspects the descriptor.
                opts.tty |= unsafe { libc::isatty(0) } == 1;
            }
            _ => bail!("give the command to run after `--` (sbx run -- uname -a)"),
        }
    }
    let dir = start_session(&a.vm.spec(&name)?, true)?;
    let result = opts
        .request(command)
        .and_then(|req| Ok(attach::exec(&dir, req)?));
    // Ephemeral: nothing in the guest is worth a graceful shutdown.
    if let Ok(info) = dir.read_info() {
        launch::end_process(&dir, info.pid, Duration::from_secs(10));
    }
    if let Err(e) = launch::remove(&dir) {
        eprintln!("sbx: {e}");
    }
    result
}
