//! The session process's seccomp filters against real guests: every thread
//! of a running session is filtered, sessions work under the filters, and
//! a thread of any kind that calls outside its list stops the session with
//! an audit record naming the thread and the call.

use sbx_tests::{output_within, text, Host, SBX_TIMEOUT};

fn write_mcp_config(dir: &std::path::Path) -> String {
    // A remote server nobody serves: the gateway starts without reaching it.
    let path = dir.join("mcp.toml");
    std::fs::write(
        &path,
        "[[mcp.server]]\nname = \"nowhere\"\nurl = \"http://127.0.0.1:9/mcp\"\n",
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn every_thread_of_a_running_session_is_filtered() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("in.txt"), "shared\n").unwrap();
    let mcp = write_mcp_config(host.dir.path());
    host.ok_in(
        &ws,
        &["start", "--name", "f", "--image", "base", "--mcp", &mcp],
    );
    // Work that wakes every kind: exec (control), the share (fs), the
    // image's disk (block), egress (refused by the default policy, but
    // carried by the proxy), the events port.
    let out = host.sh(
        "f",
        "cat /workspace/in.txt; echo new > /workspace/out.txt; ls / >/dev/null; \
         curl -s -o /dev/null -w '%{http_code}\\n' https://example.com/ || true",
    );
    assert!(
        text(&out.stdout).starts_with("shared\n"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(ws.join("host-edit.txt"), "from the host\n").unwrap();
    let out = host.sh("f", "sleep 1; cat /workspace/host-edit.txt");
    assert_eq!(
        text(&out.stdout),
        "from the host\n",
        "{}",
        text(&out.stderr)
    );

    let pid = host.session("f")["pid"].as_u64().unwrap() as u32;
    let threads = sbx_seccomp::thread_modes(pid).unwrap();
    eprintln!("{threads:?}");
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "sbx-vcpu-0",
        "sbx-vsock",
        "sbx-fs",
        "sbx-fs-watch",
        "sbx-blk",
        "sbx-rng",
        "control",
        "events-accept",
        "egress-accept",
        "mcp-accept",
        "mcp-gateway",
        "audit-sync",
        "seccomp-report",
        "seccomp-spawn",
    ] {
        assert!(
            names.contains(&expected),
            "no {expected} thread in {names:?}"
        );
    }
    let unfiltered: Vec<_> = threads.iter().filter(|(_, m)| *m != 2).collect();
    assert!(unfiltered.is_empty(), "unfiltered threads: {unfiltered:?}");

    let records = host.events("f");
    let r = records
        .iter()
        .find(|r| r["action"] == "seccomp")
        .expect("a seccomp record");
    assert_eq!(r["resource"], "enforce", "{r}");

    // Of root, the session process keeps only what its shares need, in
    // every thread, and can never regain the rest.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = |key: &str| {
        let v = status.lines().find_map(|l| l.strip_prefix(key)).unwrap();
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    let kept: u64 = sandbox::privileges::KEPT
        .iter()
        .fold(0, |m, (c, _)| m | 1 << c);
    // An ordinary user's session has no capabilities to keep, and its
    // bounding set only limits what an exec could gain, which no-new-privs
    // already forbids (and only root may shrink it).
    // SAFETY: geteuid has no preconditions.
    let keys: &[&str] = if unsafe { libc::geteuid() } == 0 {
        &["CapEff:", "CapPrm:", "CapBnd:"]
    } else {
        &["CapEff:", "CapPrm:"]
    };
    for key in keys {
        assert_eq!(mask(key) & !kept, 0, "{key} {:#x}", mask(key));
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let p = records
        .iter()
        .find(|r| r["action"] == "privileges")
        .expect("a privileges record");
    eprintln!("privileges: {p}");
    host.ok(&["stop", "f"]);
}

#[test]
fn a_call_outside_any_kinds_list_stops_the_session_naming_it() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let mcp = write_mcp_config(host.dir.path());
    // Every kind a session runs, each made to call personality(2) right
    // after its filter is in place. (The reporter is killed outright
    // instead, and signed-in shipping needs a control plane: the
    // control-plane tests run it filtered.)
    // Each kind by the name of its first thread, or of a later one where
    // the first starts before the audit log is open to record it (the
    // audit log's own sync thread).
    let kinds: [(&str, &str, &[&str]); 14] = [
        ("vcpu", "vcpu", &[]),
        ("event-loop", "event-loop", &[]),
        ("vsock", "vsock", &[]),
        ("fs", "fs", &[]),
        ("fs-watch", "fs-watch", &[]),
        ("block", "block", &["--image", "base"]),
        ("rng", "rng", &[]),
        ("events", "events", &[]),
        ("control", "control", &[]),
        ("host-edits", "host-edits", &[]),
        ("egress", "egress", &[]),
        ("mcp", "mcp", &["--mcp", &mcp]),
        ("audit", "dropped-records", &[]),
        ("spawn", "spawn", &[]),
    ];
    for (i, (kind, probe, extra)) in kinds.iter().enumerate() {
        let name = format!("p{i}");
        let mut args = vec!["start", "--name", &name];
        args.extend_from_slice(extra);
        let mut start = host.cmd(&args);
        start.current_dir(&ws).env(sbx_seccomp::PROBE_ENV, probe);
        let out = output_within(&mut start, SBX_TIMEOUT);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        eprintln!("{kind}: {said}");
        // Threads that start after the guest is ready stop the session
        // then; the rest stop its start.
        if out.status.success() {
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let session = host.session(&name);
        assert_ne!(session["state"], "running", "{kind}: {session}");
        let record = host
            .events(&name)
            .into_iter()
            .find(|r| r["action"] == "seccomp_violation")
            .unwrap_or_else(|| panic!("{kind}: no seccomp_violation record; {said}"));
        assert_eq!(record["resource"], sbx_seccomp::PROBE_SYSCALL, "{record}");
        assert_eq!(record["details"]["kind"], *kind, "{record}");
        let reason = record["details"]["reason"].as_str().unwrap();
        assert!(reason.contains("called personality"), "{reason}");
        // The person who started it is told: a failed start shows the
        // session's last lines (its directory goes), a running session's
        // log has the line.
        let told = if out.status.success() {
            std::fs::read_to_string(host.runtime().join(&name).join("sbx.log")).unwrap()
        } else {
            said
        };
        let line = format!("{kind} thread");
        assert!(
            told.contains(&line) && told.contains("called personality"),
            "{kind}: {told}"
        );
    }
}

#[test]
fn the_unsafe_flag_turns_the_filters_off_and_says_so() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let mut start = host.cmd(&["start", "--name", "u", "--unsafe-no-seccomp"]);
    start
        .current_dir(&ws)
        .env(sbx_seccomp::PROBE_ENV, "control");
    let out = output_within(&mut start, SBX_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = host.sh("u", "echo still here");
    assert_eq!(text(&out.stdout), "still here\n");
    let pid = host.session("u")["pid"].as_u64().unwrap() as u32;
    let threads = sbx_seccomp::thread_modes(pid).unwrap();
    assert!(threads.iter().all(|(_, m)| *m == 0), "{threads:?}");
    let r = host
        .events("u")
        .into_iter()
        .find(|r| r["action"] == "seccomp")
        .expect("a seccomp record");
    assert_eq!(r["resource"], "off", "{r}");
    host.ok(&["stop", "u"]);
}
