//! Helpers for the real-guest tests. These tests boot real guests, so they
//! need a KVM that can run standard kernels: `cargo xtask test` runs them
//! directly on such hosts and inside the nested test host elsewhere.

pub mod mcp;
pub mod server;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `sbx` binary under test: `$SBX_BIN`, else the workspace's debug build.
pub fn sbx_bin() -> PathBuf {
    std::env::var_os("SBX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sbx"))
}

pub fn sbx(args: &[&str]) -> Output {
    let mut cmd = Command::new(sbx_bin());
    cmd.args(args);
    output_within(&mut cmd, SBX_TIMEOUT)
}

/// No single sbx command in these tests may take longer: a hung guest fails
/// its test instead of stalling the whole suite.
pub const SBX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// Runs `cmd` to completion like `Command::output`, killing it and failing
/// the test if it takes longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: std::time::Duration) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run sbx (build it with cargo build -p host-cli)");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output().expect("wait for sbx");
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(limit).is_err() {
        // SAFETY: kills the child we spawned, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let out = waiter.join().expect("waiter thread");
        panic!(
            "{cmd:?} did not finish within {limit:?}; stdout:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    waiter.join().expect("waiter thread")
}

/// Fails the test with a clear message when this host cannot boot guests,
/// rather than letting every boot fail with a less obvious error.
pub fn require_real_kvm() {
    let host = vmm::host::probe(std::path::Path::new(vmm::host::DEFAULT_KVM_PATH));
    if let Err(e) = host.check_bootable() {
        panic!("real-guest tests need a KVM that boots standard guests; run them with `cargo xtask test`: {e}");
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last line of stdout parsed as the JSON document `sbx boot --json` prints.
pub fn json_tail(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON line in stdout:\n{stdout}\nstderr:\n{}",
                text(&out.stderr)
            )
        });
    serde_json::from_str(last).expect("valid JSON from sbx --json")
}

/// Reads `from` until what was read contains `needle`; panics on EOF or after
/// `timeout`. Returns everything read.
pub fn read_until(
    from: &mut impl std::io::Read,
    needle: &str,
    timeout: std::time::Duration,
) -> Vec<u8> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !text(&seen).contains(needle) {
        let n = from.read(&mut buf).expect("read guest output");
        assert!(
            n > 0 && std::time::Instant::now() < deadline,
            "guest never printed {needle:?}; it printed: {}",
            text(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// A private runtime and state directory, so that tests cannot see each
/// other's sessions; every session left running is killed on drop. Its
/// image store is the suite's (`$SBX_TEST_IMAGES`, where `cargo xtask
/// test` imported the base image), read-only in the nested test host.
pub struct Host {
    pub dir: tempfile::TempDir,
}

/// The standard output of a host command that must succeed.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The image store `cargo xtask test` prepared, holding `base`.
pub fn test_images() -> PathBuf {
    PathBuf::from(std::env::var_os("SBX_TEST_IMAGES").expect(
        "SBX_TEST_IMAGES names the image store with the base image; run the suite with `cargo xtask test`",
    ))
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    pub fn new() -> Host {
        require_real_kvm();
        Host {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The directories sbx is pointed at, as environment variables.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let mut env = vec![
            ("SBX_RUNTIME_DIR", self.runtime()),
            ("SBX_STATE_DIR", self.dir.path().join("state")),
            ("SBX_CONFIG_DIR", self.dir.path().join("config")),
        ];
        if let Some(images) = std::env::var_os("SBX_TEST_IMAGES") {
            env.push(("SBX_CACHE_DIR", PathBuf::from(images)));
        }
        env
    }

    /// Points this test process itself at the host's directories, for
    /// tests that drive sessions through the `sandbox` library (the
    /// session processes it starts inherit them). The real-guest tests
    /// run one at a time, so nothing else reads the environment meanwhile.
    pub fn adopt(&self) {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(sbx_bin());
        c.args(args).envs(self.env());
        c
    }

    pub fn sbx(&self, args: &[&str]) -> Output {
        output_within(&mut self.cmd(args), SBX_TIMEOUT)
    }

    /// `sbx ARGS` run from `dir` (whose contents become /workspace).
    pub fn sbx_in(&self, dir: &Path, args: &[&str]) -> Output {
        output_within(self.cmd(args).current_dir(dir), SBX_TIMEOUT)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        Self::succeeded(args, self.sbx(args))
    }

    pub fn ok_in(&self, dir: &Path, args: &[&str]) -> String {
        Self::succeeded(args, self.sbx_in(dir, args))
    }

    /// The output of a command that must have exited 0.
    fn succeeded(args: &[&str], out: Output) -> String {
        assert_eq!(
            out.status.code(),
            Some(0),
            "sbx {args:?} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `script` run by the guest's shell in `session`.
    pub fn sh(&self, session: &str, script: &str) -> Output {
        self.sbx(&["exec", session, "--", "sh", "-c", script])
    }

    /// The session's audit records, one JSON value each.
    pub fn events(&self, session: &str) -> Vec<serde_json::Value> {
        self.ok(&["events", session, "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `sbx secret set NAME` with `value` on its standard input.
    pub fn secret(&self, name: &str, value: &str) {
        use std::io::Write;
        let mut set = self.cmd(&["secret", "set", name]);
        set.stdin(std::process::Stdio::piped());
        let mut child = set.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(value.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sbx secret set {name}");
    }

    pub fn start(&self, name: &str) {
        self.ok(&["start", "--name", name]);
    }

    pub fn session(&self, name: &str) -> serde_json::Value {
        let all: serde_json::Value = serde_json::from_str(&self.ok(&["ls", "--json"])).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.runtime())
            .into_iter()
            .flatten()
            .flatten()
        {
            let info =
                std::fs::read_to_string(entry.path().join("session.json")).unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&info) {
                if let Some(pid) = v["pid"].as_i64() {
                    if alive(pid as i32) && cmdline(pid as i32).contains("__session") {
                        // SAFETY: kills a session process this test started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

pub fn alive(pid: i32) -> bool {
    // Zombies are gone for our purposes: they hold nothing but a PID.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs `sbx login` (`cmd`) until it shows its code, has `approve`
/// approve that code (as a person would, on the server), and waits for the
/// sign-in to finish; returns the line that showed the code.
pub fn sign_in(mut cmd: Command, approve: impl FnOnce(&str)) -> String {
    use std::io::{BufRead, BufReader};
    let mut login = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open until the end: the CLI still writes to it.
    let mut err = BufReader::new(login.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let code = line
        .split_whitespace()
        .find(|w| w.len() == 9 && w.as_bytes()[4] == b'-')
        .unwrap_or_else(|| panic!("no code in {line:?}"));
    approve(code);
    let out = login.wait_with_output().unwrap();
    assert!(out.status.success(), "sbx login: {}", text(&out.stdout));
    line
}
