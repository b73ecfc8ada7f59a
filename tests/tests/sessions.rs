//! Sessions against real guests: start, exec, shell, ls, stop, rm, run,
//! events, and a guest (or client) that misbehaves.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sbx_tests::{alive, cmdline, sbx_bin, sha256, text, Host};

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != std::process::id() as i32 && alive(pid))
        .map(cmdline)
        .filter(|c| c.contains(needle.as_ref()))
        .collect()
}

#[test]
fn run_passes_each_stream_and_the_exit_status() {
    let host = Host::new();
    let out = host.sbx(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // Ephemeral: nothing is left behind but the audit log.
    let left: Vec<_> = std::fs::read_dir(host.runtime())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(processes_mentioning(&host.runtime()).is_empty());
}

#[test]
fn a_session_carries_100_mib_each_way_and_20_concurrent_execs() {
    let host = Host::new();
    host.start("s1");
    let s = host.session("s1");
    assert_eq!(s["state"], "running");
    assert_eq!(
        (s["vcpus"].as_u64(), s["mem_mib"].as_u64()),
        (Some(1), Some(256))
    );

    // Host to guest: stdin, checked by the guest's sha256sum.
    let data = host.dir.path().join("x");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 100M /dev/urandom > '{}'", data.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let out = host
        .cmd(&["exec", "s1", "--", "sha256sum"])
        .stdin(std::fs::File::open(&data).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}  -\n", sha256(&data)));

    // Guest to host: stdout, counted here.
    let mut exec = host
        .cmd(&["exec", "s1", "--", "head", "-c", "104857600", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let wc = Command::new("wc")
        .arg("-c")
        .stdin(exec.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(exec.wait().unwrap().success());
    assert_eq!(text(&wc.stdout).trim(), "104857600");

    // Twenty at once.
    let children: Vec<_> = (0..20)
        .map(|i| {
            host.cmd(&[
                "exec",
                "s1",
                "--",
                "sh",
                "-c",
                "echo $0; exit $(($0 % 3))",
                &i.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i as i32 % 3),
            "exec {i}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), format!("{i}\n"));
    }

    // The guest agent reported what ran, with exit codes, into the session's events.
    let events = host.ok(&["events", "s1", "--json"]);
    let records: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let action = |a: &str| records.iter().filter(|r| r["action"] == a).count();
    assert_eq!(action("agent_ready"), 1);
    assert_eq!(action("process_started"), 22);
    assert_eq!(action("process_exited"), 22);
    assert!(records
        .iter()
        .any(|r| r["action"] == "process_exited" && r["details"]["code"] == 2));

    // Stopping leaves a stopped record, no sockets and no processes.
    host.ok(&["stop", "s1"]);
    assert_eq!(host.session("s1")["state"], "stopped");
    let dir = host.runtime().join("s1");
    for sock in ["ctl.sock", "vsock.sock"] {
        assert!(!dir.join(sock).exists(), "{sock} left behind");
    }
    assert!(processes_mentioning(&host.runtime()).is_empty());
    host.ok(&["rm", "s1"]);
    assert!(!dir.exists());
}

#[test]
fn a_killed_session_shows_dead_and_rm_cleans_it() {
    let host = Host::new();
    host.start("k1");
    let pid = host.session("k1")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kills the session process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host.session("k1")["state"], "dead");
    let out = host.sbx(&["exec", "k1", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("not running (it is dead)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    host.ok(&["rm", "k1"]);
    assert!(!host.runtime().join("k1").exists());
    assert!(processes_mentioning(&host.runtime()).is_empty());
}

#[test]
fn mistakes_get_one_clear_line_and_a_failing_status() {
    let host = Host::new();
    let out = host.sbx(&["exec", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        text(&out.stderr),
        "sbx: no session named `nope`; `sbx ls` lists sessions\n"
    );
    host.start("e1");
    let out = host.sbx(&["exec", "e1", "--", "no-such-command", "x"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "sbx: no-such-command: command not found in the guest\n"
    );
    let out = host.sbx(&["start", "--name", "e1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("already exists (running)"),
        "{}",
        text(&out.stderr)
    );
    let out = host.sbx(&["rm", "e1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("`sbx stop e1` first"),
        "{}",
        text(&out.stderr)
    );
    host.ok(&["stop", "e1"]);
    let out = host.sbx(&["exec", "e1", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("not running (it is stopped)"));
    let out = host.sbx(&["stop", "e1"]);
    assert_eq!(out.status.code(), Some(125));
    host.ok(&["rm", "e1"]);
}

/// A process that never reads its input holds back only its own client:
/// other execs in the session and other sessions go on.
#[test]
fn a_process_that_never_reads_stdin_stalls_nothing_else() {
    let host = Host::new();
    host.start("a");
    host.start("b");
    let mut stuck = host
        .cmd(&["exec", "a", "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = stuck.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        // Stops when the pipe fills (credit exhausted) and the write blocks
        // for good; the pipe closes when the client is killed.
        while input.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(3));
    for (session, word) in [("a", "still-fine"), ("b", "other-fine")] {
        let started = Instant::now();
        let out = host.sbx(&["exec", session, "--", "echo", word]);
        assert_eq!(
            text(&out.stdout),
            format!("{word}\n"),
            "{}",
            text(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    stuck.kill().unwrap();
    stuck.wait().unwrap();
    let sent = writer.join().unwrap();
    // The client stopped taking input at about its credit plus the pipe.
    assert!(
        sent < 8 << 20,
        "{sent} bytes were taken from a process that reads nothing"
    );
    host.ok(&["stop", "a"]);
    host.ok(&["stop", "b"]);
}

/// The Firecracker-style hybrid socket: a host tool connects to a guest
/// port with `CONNECT <port>`; sbx's own agent port is refused to it.
#[test]
fn the_hybrid_socket_serves_guest_ports_but_not_the_agent() {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;
    let host = Host::new();
    host.start("h1");
    let sock = host.runtime().join("h1/vsock.sock");

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "CONNECT 1024").unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "the agent port must be refused"
    );

    // Nothing listens on port 5000 in the guest: the connection is closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "CONNECT 5000").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "");

    // Garbage instead of a handshake is dropped too.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"HELLO THERE\n").unwrap();
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);

    assert_eq!(host.ok(&["exec", "h1", "--", "echo", "ok"]), "ok\n");
    host.ok(&["stop", "h1"]);
}

/// `sbx shell` under tmux: typing, window size, Ctrl-C.
#[test]
fn the_shell_works_under_tmux() {
    let host = Host::new();
    host.start("t1");
    let socket = host.dir.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .expect("tmux is installed by `cargo xtask test`");
        text(&out.stdout)
    };
    let shell = format!(
        "SBX_RUNTIME_DIR='{}' SBX_STATE_DIR='{}' '{}' shell t1",
        host.runtime().display(),
        host.dir.path().join("state").display(),
        sbx_bin().display()
    );
    tmux(&["new-session", "-d", "-x", "80", "-y", "24", &shell]);
    let screen_has = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = tmux(&["capture-pane", "-p"]);
            if screen.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    tmux(&["send-keys", "echo h''i-there", "Enter"]);
    screen_has("hi-there");
    tmux(&["send-keys", "stty size", "Enter"]);
    screen_has("24 80");
    tmux(&["resize-window", "-x", "100", "-y", "30"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "stty size", "Enter"]);
    screen_has("30 100");
    // Ctrl-C must end the sleep long before its 100 s are up.
    tmux(&["send-keys", "sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_secs(1));
    tmux(&["send-keys", "C-c"]);
    tmux(&["send-keys", "echo after-$((6*7))", "Enter"]);
    screen_has("after-42");
    tmux(&["send-keys", "exit", "Enter"]);
    tmux(&["kill-server"]);
    host.ok(&["stop", "t1"]);
}

/// CPU time (user and system, in clock ticks) a process has used, all its
/// threads together.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, so 11 and 12 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The session process's CPU ticks over `d`.
fn cpu_over(pid: u64, d: Duration) -> u64 {
    let before = cpu_ticks(pid);
    std::thread::sleep(d);
    cpu_ticks(pid) - before
}

#[test]
fn a_paused_session_uses_no_cpu_and_resumes_where_it_was() {
    let host = Host::new();
    host.start("p");
    let pid = host.session("p")["pid"].as_u64().unwrap();
    // A guest process that keeps the vCPU busy: an idle guest costs the
    // host almost nothing, so only a busy one shows what a pause stops.
    host.ok(&[
        "exec",
        "p",
        "--",
        "sh",
        "-c",
        "echo kept > /tmp/mark; setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &",
    ]);
    let uptime = |host: &Host| -> f64 {
        let out = host.ok(&["exec", "p", "--", "cat", "/proc/uptime"]);
        out.split_whitespace().next().unwrap().parse().unwrap()
    };
    let up_before = uptime(&host);
    let busy = cpu_over(pid, Duration::from_secs(3));
    assert!(
        busy >= 100,
        "a busy guest used {busy} ticks in 3 s: too few to tell a pause by"
    );

    let out: serde_json::Value = serde_json::from_str(&host.ok(&["pause", "p", "--json"])).unwrap();
    assert_eq!(out["state"], "paused", "{out}");
    assert_eq!(host.session("p")["state"], "paused");
    let paused = cpu_over(pid, Duration::from_secs(3));
    eprintln!(
        "session process CPU over 3 s: busy {busy} ticks, paused {paused} ticks; pause took {} ms",
        out["took_ms"]
    );
    // A paused guest runs nothing: no timer ticks, no exits. What is left
    // is the host side waiting on its sockets.
    assert!(paused <= 2, "a paused session used {paused} ticks in 3 s");
    // Pausing again says so and changes nothing.
    let again = host.sbx(&["pause", "p"]);
    assert!(again.status.success());
    assert!(
        text(&again.stderr).contains("already paused"),
        "{}",
        text(&again.stderr)
    );
    // Commands wait for a resume, and say so.
    let exec = host.sbx(&["exec", "p", "--", "true"]);
    assert!(!exec.status.success());
    assert!(
        text(&exec.stderr).contains("is paused; `sbx resume p` first"),
        "{}",
        text(&exec.stderr)
    );

    host.ok(&["resume", "p"]);
    assert_eq!(host.session("p")["state"], "running");
    // Where it was: the guest's files and its clock, which went on.
    assert_eq!(host.ok(&["exec", "p", "--", "cat", "/tmp/mark"]), "kept\n");
    let up_after = uptime(&host);
    assert!(
        up_after > up_before + 5.0,
        "uptime {up_before} then {up_after}"
    );
    let kernel_log = host.ok(&["exec", "p", "--", "dmesg"]);
    assert!(
        !kernel_log.contains("soft lockup"),
        "the guest took the pause for a hang:\n{kernel_log}"
    );
    let actions: Vec<String> = host
        .events("p")
        .iter()
        .filter_map(|r| r["action"].as_str().map(String::from))
        .filter(|a| a == "pause" || a == "resume")
        .collect();
    assert_eq!(actions, ["pause", "resume"]);

    // A paused session stops as gracefully as a running one.
    host.ok(&["pause", "p"]);
    let out = host.sbx(&["stop", "p"]);
    assert!(
        text(&out.stderr).contains("stopped"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(host.session("p")["state"], "stopped");
    let out = host.sbx(&["resume", "p"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is stopped"),
        "{}",
        text(&out.stderr)
    );
}
