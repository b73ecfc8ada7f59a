//! A session's MCP gateway (`sbx-mcp`), wired into the session: served on
//! its vsock port to the guest and on `mcp.sock` in the session directory
//! to `sbx mcp`, fed the policy, the audit log and the session's secrets.
//!
//! Each stdio server runs in a microVM of its own: a session named
//! `<agent>-mcp-<server>`, booted from the server's image under its own
//! policy (no network unless that policy allows it, no share of the
//! agent's unless listed), started on first use and stopped with the
//! agent's session. The session process is confined (Landlock) and cannot
//! start sessions itself, so it asks a helper it starts before confining
//! itself (`sbx __mcp-servers AGENT`, [`helper_main`]) over a pipe: one
//! server name per line, `ok` or `error: ...` back. The helper stops every
//! server session when that pipe closes, whichever way the agent's
//! session ends.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sbx_audit::{AuditLog, Entry};
use sbx_mcp::{
    Gateway, Launcher, Options, Pins, Pipes, Server, ServerSpec, StdioServer, Transport,
};
use sbx_policy::{Policy, Selection};
use sbx_protocol::mcp::HOST_PORT;
use serde_json::json;
use vmm::devices::virtio::vsock::VsockHost;

use crate::attach::{self, Io, Request};
use crate::error::{fail, At, Error, Result};
use crate::secrets::Store;
use crate::spec::{MountSpec, PolicySpec, SessionSpec};
use crate::state::Dir;
use crate::{disks, launch, paths, sys};

/// Where tool pins live: shared by every session of this user.
pub fn pins() -> Pins {
    Pins::at(paths::state_dir().join("mcp").join("pins.json"))
}

/// The session name of `agent`'s stdio server `server`.
pub fn server_session(agent: &str, server: &str) -> String {
    format!("{agent}-mcp-{server}")
}

/// The helper that starts server sessions, as the session process sees it.
pub struct Helper {
    child: Child,
    io: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
}

impl Helper {
    /// Starts `sbx __mcp-servers AGENT` (before the session confines
    /// itself: the helper is not confined, as it starts VMs).
    pub fn spawn(agent: &str) -> Result<Helper> {
        let sbx = std::env::current_exe().at(|| "cannot find the sbx binary".into())?;
        let mut child = Command::new(sbx)
            .arg("__mcp-servers")
            .arg(agent)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .at(|| "cannot start the MCP server helper".into())?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            fail!(Session, "the MCP server helper has no pipes");
        };
        Ok(Helper {
            child,
            io: Mutex::new((stdin, BufReader::new(stdout))),
        })
    }

    /// Has server `name`'s session started (if it is not running yet).
    fn ensure(&self, name: &str) -> std::result::Result<(), String> {
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let (stdin, stdout) = &mut *io;
        writeln!(stdin, "{name}").map_err(|e| format!("the MCP server helper is gone: {e}"))?;
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err("the MCP server helper is gone".into()),
            Ok(_) => match line.trim_end().strip_prefix("error: ") {
                Some(e) => Err(e.to_string()),
                None => Ok(()),
            },
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing its input tells the helper to stop the servers.
        drop(self.io.lock().map(|mut io| io.0.flush()));
        let _ = self.child.try_wait();
    }
}

/// Runs stdio servers in their sessions.
struct VmLauncher {
    agent: String,
    helper: Helper,
    /// Where each server's errors go: `mcp-<server>.log`.
    logs: PathBuf,
}

impl Launcher for VmLauncher {
    fn open(&self, server: &ServerSpec, stdio: &StdioServer) -> std::result::Result<Pipes, String> {
        self.helper.ensure(&server.name)?;
        let dir =
            Dir::new(&server_session(&self.agent, &server.name)).map_err(|e| e.to_string())?;
        let (in_r, in_w) = sys::pipe().map_err(|e| e.to_string())?;
        let (out_r, out_w) = sys::pipe().map_err(|e| e.to_string())?;
        let log_path = self.logs.join(format!("mcp-{}.log", server.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let req = Request {
            argv: stdio.command.clone(),
            env: stdio.env.clone(),
            cwd: stdio.cwd.clone(),
            user: stdio.user.clone(),
            tty: false,
        };
        let name = server.name.clone();
        std::thread::Builder::new()
            .name(format!("mcp-{name}"))
            .spawn(move || {
                use std::os::fd::AsRawFd;
                let io = Io {
                    stdin: Some(in_r.as_raw_fd()),
                    stdout: out_w.as_raw_fd(),
                    stderr: log.as_raw_fd(),
                    signals: false,
                };
                let ended = attach::exec_with(&dir, req, io);
                let mut log = &log;
                let _ = match ended {
                    Ok(code) => writeln!(log, "sbx: MCP server `{name}` exited with status {code}"),
                    Err(e) => writeln!(log, "sbx: MCP server `{name}`: {e}"),
                };
                // Its output's end tells the gateway the server is gone.
                drop((in_r, out_w));
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Pipes {
            to_server: in_w,
            from_server: out_r,
        })
    }
}

/// Starts the gateway for `spec`'s servers, serving the guest on its vsock
/// port and `sbx mcp` on the session directory's `mcp.sock`.
pub fn start(
    spec: &SessionSpec,
    dir: &Dir,
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    host: &VsockHost,
    helper: Helper,
    secrets: Vec<(String, String)>,
) -> Result<Arc<Server>> {
    let store = Store::open();
    let mut bearers = HashMap::new();
    for s in &spec.mcp {
        if let Transport::Remote(r) = &s.transport {
            if let Some(secret) = &r.bearer_secret {
                match store.get(secret)? {
                    Some(v) => {
                        bearers.insert(s.name.clone(), v);
                    }
                    None => fail!(
                        Invalid,
                        "MCP server `{}` ({}) authenticates with secret {secret}, which is not stored: run `sbx secret set {secret}`",
                        s.name,
                        s.declared
                    ),
                }
            }
        }
    }
    let names: Vec<&str> = spec.mcp.iter().map(|s| s.name.as_str()).collect();
    log.record(Entry::mcp_server(
        "gateway_started",
        &format!("vsock port {HOST_PORT}"),
        json!({ "servers": names, "pins": pins().path() }),
    ))?;
    let gateway = Gateway::new(Options {
        servers: spec.mcp.clone(),
        policy,
        log,
        pins: pins(),
        secrets,
        bearers,
        launcher: Arc::new(VmLauncher {
            agent: spec.name.clone(),
            helper,
            logs: dir.path.clone(),
        }),
    });
    let server = Server::new(gateway).at(|| "cannot start the MCP gateway".into())?;
    server
        .serve_guest(host.listen(HOST_PORT).into_iter())
        .at(|| "cannot start the MCP gateway".into())?;
    let _ = std::fs::remove_file(dir.mcp_path());
    let listener = std::os::unix::net::UnixListener::bind(dir.mcp_path())
        .at(|| format!("cannot listen on {}", dir.mcp_path().display()))?;
    server
        .serve_host(listener)
        .at(|| "cannot start the MCP gateway".into())?;
    Ok(server)
}

/// The files the session process reads or writes for the gateway after
/// it confines itself: `(read, read_write)`.
pub fn confined_paths(spec: &SessionSpec) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let pins_dir = paths::state_dir().join("mcp");
    let _ = std::fs::create_dir_all(&pins_dir);
    let read = spec
        .mcp
        .iter()
        .filter_map(|s| match &s.transport {
            Transport::Remote(r) => r.ca.clone(),
            Transport::Stdio(_) => None,
        })
        .collect();
    (read, vec![pins_dir])
}

/// Server `server`'s session: its image, its own policy (the organisation's
/// layer and the server's files; the locked-down preset when it names
/// none), its own shares, the agent's kernel and initramfs.
fn server_spec(
    agent: &SessionSpec,
    server: &ServerSpec,
    stdio: &StdioServer,
) -> Result<SessionSpec> {
    let org: Vec<PathBuf> = agent
        .policy
        .locations
        .found()
        .into_iter()
        .filter(|f| f.starts_with(&agent.policy.locations.system))
        .collect();
    let mut files = org;
    files.extend(stdio.policy.iter().cloned());
    let selection = Selection {
        files,
        preset: None,
        trusted_keys: agent.policy.selection.trusted_keys.clone(),
        texts: Vec::new(),
    };
    let mut s = SessionSpec::new(&server_session(&agent.name, &server.name), &selection)?;
    s.policy = PolicySpec {
        selection,
        locations: agent.policy.locations.clone(),
    };
    s.vm.kernel = agent.vm.kernel.clone();
    s.vm.initrd = agent.vm.initrd.clone();
    s.vm.kvm = agent.vm.kvm.clone();
    s.vm.vcpus = 1;
    s.vm.mem_mib = stdio.mem_mib;
    s.egress = agent.egress.clone();
    for m in &stdio.mounts {
        s.mounts.push(MountSpec::parse(m).map_err(|e| {
            Error::Invalid(format!(
                "MCP server `{}` ({}): {e}",
                server.name, server.declared
            ))
        })?);
    }
    if let Some(image) = &stdio.image {
        s.root = Some(disks::resolve(image, Some(1 << 30)).map_err(|e| {
            Error::Invalid(format!(
                "MCP server `{}` ({}): {e}",
                server.name, server.declared
            ))
        })?);
    }
    s.user = stdio.user.clone();
    Ok(s)
}

/// `sbx __mcp-servers AGENT`: starts agent `AGENT`'s stdio servers'
/// sessions as the session process asks (one name a line on standard
/// input, `ok` or `error: ...` on standard output), and stops and removes
/// them all when its input ends.
pub fn helper_main(agent: &str) -> Result<()> {
    let dir = Dir::new(agent)?;
    let spec = SessionSpec::read(&dir.spec_path())?;
    let sbx = std::env::current_exe().at(|| "cannot find the sbx binary".into())?;
    let mut started: Vec<String> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(name) = line else { break };
        let answer = start_server(&spec, name.trim(), &sbx, &mut started);
        let reply = match answer {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {}", e.to_string().replace('\n', " ")),
        };
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    for name in started {
        stop_server(&name);
    }
    Ok(())
}

fn start_server(
    spec: &SessionSpec,
    name: &str,
    sbx: &Path,
    started: &mut Vec<String>,
) -> Result<()> {
    let Some(server) = spec.mcp.iter().find(|s| s.name == name) else {
        fail!(Invalid, "no MCP server `{name}` in session `{}`", spec.name);
    };
    let Transport::Stdio(stdio) = &server.transport else {
        fail!(Invalid, "MCP server `{name}` is remote: it has no session");
    };
    let session = server_session(&spec.name, name);
    if let Ok((_, info)) = Dir::existing(&session) {
        if matches!(info.state, crate::state::Phase::Running) {
            return Ok(());
        }
        stop_server(&session);
    }
    let s = server_spec(spec, server, stdio)?;
    launch::start(&s, sbx, || {})?;
    if !started.contains(&session) {
        started.push(session);
    }
    Ok(())
}

/// Stops a server's session and removes it (its disk too): servers keep
/// nothing between agent sessions.
fn stop_server(session: &str) {
    if let Ok((dir, info)) = Dir::existing(session) {
        launch::stop(&dir, info.pid, Duration::from_secs(10));
        let _ = launch::remove(&dir);
    }
}

/// The servers a session started here gets: those `files` declare, or,
/// when none is given, those of `~/.config/sbx/mcp.toml` and then
/// `./.sbx/mcp.toml` (the project's), when they exist.
pub fn servers(files: &[PathBuf]) -> Result<Vec<ServerSpec>> {
    let files: Vec<PathBuf> = if files.is_empty() {
        let cwd = std::env::current_dir().at(|| "cannot read the current directory".into())?;
        [
            paths::config_dir().join("mcp.toml"),
            cwd.join(".sbx").join("mcp.toml"),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
    } else {
        files
            .iter()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
            .collect()
    };
    sbx_mcp::config::load_all(&files).map_err(|e| Error::Invalid(e.to_string()))
}

/// Running sessions that serve a gateway (their `mcp.sock` exists).
pub fn sessions_with_gateway() -> Vec<Dir> {
    let Ok(entries) = std::fs::read_dir(paths::runtime_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<Dir> = entries
        .flatten()
        .filter_map(|e| Dir::new(&e.file_name().to_string_lossy()).ok())
        .filter(|d| d.mcp_path().exists())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
