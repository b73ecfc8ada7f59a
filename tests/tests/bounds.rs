//! A guest that floods what the host records. Refusals stay refused, but
//! past the session's limits they are counted instead of written one by
//! one, every excess is accounted for in a `records_dropped` record, and
//! the session keeps answering.

use std::time::Instant;

use sbx_tests::{text, Host};

/// Recorded refusals and console reports, and those counted as dropped.
fn tally(
    records: &[serde_json::Value],
    what: &str,
    recorded: impl Fn(&serde_json::Value) -> bool,
) -> (u64, u64) {
    let shown = records.iter().filter(|r| recorded(r)).count() as u64;
    let dropped = records
        .iter()
        .filter(|r| r["action"] == "records_dropped" && r["resource"] == what)
        .map(|r| r["details"]["count"].as_u64().unwrap())
        .sum();
    (shown, dropped)
}

#[test]
fn floods_of_refusals_and_console_reports_are_bounded_and_counted() {
    let host = Host::new();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join(".env"), "TOKEN=1").unwrap();
    host.ok_in(ws.path(), &["start", "--name", "b"]);

    // `[ -e .env ]` is a shell builtin: each one is a refused lookup.
    let tries = 3000;
    let started = Instant::now();
    let out = host.sh(
        "b",
        &format!("i=0; while [ $i -lt {tries} ]; do [ -e .env ]; i=$((i+1)); done; echo done"),
    );
    let refusing = started.elapsed().as_secs_f64();
    assert_eq!(text(&out.stdout), "done\n", "{}", text(&out.stderr));

    let lines = 200;
    let started = Instant::now();
    let out = host.sh(
        "b",
        &format!("i=0; while [ $i -lt {lines} ]; do echo 'Oops: flood' > /dev/console; i=$((i+1)); done; echo done"),
    );
    let oopsing = started.elapsed().as_secs_f64();
    assert_eq!(text(&out.stdout), "done\n", "{}", text(&out.stderr));
    assert_eq!(host.ok(&["exec", "b", "--", "echo", "alive"]), "alive\n");
    host.ok(&["stop", "b"]);

    let records = host.events("b");
    let (refusals, dropped) = tally(&records, "fs refusals", |r| {
        r["decision"] == "deny" && r["surface"] == "fs"
    });
    eprintln!(
        "{tries} refused lookups in {refusing:.1} s: {refusals} recorded, {dropped} counted \
         (limit: 200 at once, then 20 a second)"
    );
    assert_eq!(refusals + dropped, tries);
    assert!(
        refusals as f64 <= 200.0 + 20.0 * refusing + 1.0,
        "{refusals} refusals recorded in {refusing:.1} s"
    );
    let (reports, dropped) = tally(&records, "console reports", |r| {
        r["action"] == "kernel_oops"
    });
    eprintln!(
        "{lines} oops lines in {oopsing:.1} s: {reports} recorded, {dropped} counted \
         (limit: 10 at once, then 1 a second)"
    );
    assert_eq!(reports + dropped, lines);
    assert!(
        reports as f64 <= 10.0 + oopsing + 1.0,
        "{reports} reports recorded in {oopsing:.1} s"
    );
}

/// A guest writing without end into its workspace stops at the session's
/// share quota: the host's disk keeps what the quota allows, rewriting
/// inside a file still works, and the session keeps answering.
#[test]
fn a_share_quota_stops_a_guest_filling_the_host_disk() {
    let host = Host::new();
    let ws = host.dir.path().join("project");
    std::fs::create_dir(&ws).unwrap();
    host.ok_in(&ws, &["start", "--name", "q", "--share-quota", "4M"]);
    // dd says what each write got (busybox head reports any failure as EIO).
    let out = host.sh("q", "dd if=/dev/zero of=big bs=65536 count=160; echo $?");
    assert!(
        text(&out.stderr).contains("No space left on device"),
        "{}",
        text(&out.stderr)
    );
    assert_ne!(text(&out.stdout), "0\n");
    let size = std::fs::metadata(ws.join("big")).unwrap().len();
    eprintln!("10 MiB written under a 4 MiB share quota: {size} bytes reached the host");
    assert_eq!(size, 4 << 20, "the writes that fit, and nothing past them");
    let out = host.sh(
        "q",
        "printf x | dd of=big bs=1 seek=10 conv=notrunc 2>/dev/null && echo rewrote",
    );
    assert_eq!(text(&out.stdout), "rewrote\n", "{}", text(&out.stderr));
    assert_eq!(host.ok(&["exec", "q", "--", "echo", "alive"]), "alive\n");
    host.ok(&["stop", "q"]);
    let refused = host
        .events("q")
        .into_iter()
        .find(|r| r["rule_id"] == "share-quota")
        .expect("the refusal is recorded");
    assert_eq!(refused["decision"], "deny");
    assert_eq!(refused["resource"], "/workspace/big");
}

/// The session process lives in a cgroup of its own sized to its VM: CPU
/// for its vCPUs plus one, a bound on threads, its memory accounted; a
/// share kept in memory with no quota leaves memory unlimited, and the
/// audit log says why and what would bound it.
#[test]
fn a_session_runs_in_a_cgroup_sized_to_its_vm() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    host.ok_in(
        &ws,
        &["start", "--name", "cg", "--vcpus", "2", "--mem", "384"],
    );
    let pid = host.session("cg")["pid"].as_u64().unwrap();
    let r = host
        .events("cg")
        .into_iter()
        .find(|r| r["action"] == "cgroup")
        .expect("a cgroup record");
    // Root's sessions go under the root; a user's under the cgroup the
    // host delegated to them.
    let path = r["resource"].as_str().unwrap().to_string();
    let dir = std::path::Path::new(&path);
    let rel = dir
        .strip_prefix("/sys/fs/cgroup")
        .unwrap_or_else(|_| panic!("{r}"));
    assert!(rel.ends_with("sbx/cg"), "{r}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(rel, std::path::Path::new("sbx/cg"), "{r}");
    }
    let member = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(member.trim(), format!("0::/{}", rel.display()), "{member}");
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("cpu.max"), "300000 100000");
    assert_eq!(read("pids.max"), sandbox::cgroup::PIDS_MAX.to_string());
    let memory = &r["details"]["memory"];
    if sandbox::memory::in_memory(&ws) {
        let said = memory.as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(
            said.starts_with(&format!("not limited: the shares at {}", ws.display())),
            "{said}"
        );
        assert!(said.contains("--share-quota"), "{said}");
        assert_eq!(read("memory.max"), "max");
    }
    // The guest's memory is charged to it.
    let out = host.sh(
        "cg",
        "head -c 100000000 /dev/zero | cat > /dev/null; echo ok",
    );
    assert_eq!(text(&out.stdout), "ok\n", "{}", text(&out.stderr));
    let current: u64 = read("memory.current").parse().unwrap();
    eprintln!(
        "memory.current {current}, pids.current {}",
        read("pids.current")
    );
    assert!(current > 32 << 20, "memory.current {current}");
    host.ok(&["stop", "cg"]);
}

/// Where every file the session keeps in memory has a bound, its cgroup
/// limits its memory to guest RAM, the VMM's allowance and those bounds;
/// a guest that fills its RAM and its share quota on tmpfs stays inside
/// and is not killed.
#[test]
fn a_session_s_memory_is_limited_to_its_ram_allowance_and_files_in_memory() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    // The audit log grows for as long as the session lives: it goes on a
    // disk (here, /tmp may be in memory).
    let audit = host.dir.path().join("state/audit");
    if sandbox::memory::in_memory(&audit) {
        let disk = std::env::var_os("SBX_TEST_DISK_DIR").expect(
            "where /tmp is in memory this test needs SBX_TEST_DISK_DIR, a directory of yours on a disk (cargo xtask test makes one)",
        );
        let mine = std::path::Path::new(&disk).join(format!("audit-{}", std::process::id()));
        std::fs::create_dir(&mine).unwrap();
        std::fs::set_permissions(&mine, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        std::fs::create_dir_all(audit.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&mine, &audit).unwrap();
    }
    let quota = 96u64 << 20;
    host.ok_in(
        &ws,
        &[
            "start",
            "--name",
            "mem",
            "--mem",
            "384",
            "--share-quota",
            "96M",
        ],
    );
    let r = host
        .events("mem")
        .into_iter()
        .find(|r| r["action"] == "cgroup")
        .expect("a cgroup record");
    let dir = std::path::PathBuf::from(r["resource"].as_str().unwrap());
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let memory = &r["details"]["memory"];
    let max = memory["max"]
        .as_u64()
        .unwrap_or_else(|| panic!("memory is not limited: {r}"));
    assert_eq!(read("memory.max"), max.to_string(), "{r}");
    let parts = memory["parts"].as_array().unwrap();
    let sum: u64 = parts.iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, max, "{r}");
    let part = |what: &str| {
        parts
            .iter()
            .find(|p| p["what"].as_str().unwrap().starts_with(what))
            .map(|p| p["bytes"].as_u64().unwrap())
    };
    assert_eq!(part("guest RAM"), Some(384 << 20), "{r}");
    assert_eq!(part("VMM allowance"), Some(sandbox::memory::VMM_ALLOWANCE));
    let shares_in_memory = sandbox::memory::in_memory(&ws);
    assert_eq!(
        part("the shares in memory"),
        shares_in_memory.then_some(quota),
        "{r}"
    );

    // The guest fills its share quota and most of its RAM.
    let out = host.sh(
        "mem",
        "dd if=/dev/zero of=/workspace/big bs=1M count=128 2>&1 | tail -1; \
         mkdir -p /fill && mount -t tmpfs -o size=200m tmpfs /fill && \
         dd if=/dev/zero of=/fill/x bs=1M count=180 2>&1 | tail -1; echo done",
    );
    let said = text(&out.stdout);
    assert!(said.ends_with("done\n"), "{said}{}", text(&out.stderr));
    assert_eq!(
        std::fs::metadata(ws.join("big")).unwrap().len(),
        quota,
        "{said}"
    );
    let peak = read("memory.peak");
    eprintln!(
        "memory.max {max} ({} MiB), memory.peak {peak}, memory.current {}, shares in memory: {shares_in_memory}",
        max >> 20,
        read("memory.current")
    );
    assert_eq!(host.ok(&["exec", "mem", "--", "echo", "alive"]), "alive\n");
    let events = read("memory.events");
    assert!(events.contains("oom_kill 0"), "{events}");
    host.ok(&["stop", "mem"]);
}

/// Empties a test's tiny disk however the test ends (it may be shared).
struct Emptied(std::path::PathBuf);

impl Drop for Emptied {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Unmounts a test's tmpfs however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The audit log on a disk that fills up fails closed: nothing more is
/// done unrecorded (an exec is refused, naming the log), and the log keeps
/// ending with a whole record, so it still verifies.
#[test]
fn a_full_audit_disk_fails_closed() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let audit = host.dir.path().join("state/audit");
    // SAFETY: geteuid has no preconditions.
    let _mounted = if unsafe { libc::geteuid() } == 0 {
        std::fs::create_dir_all(&audit).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&audit)
            .status()
            .unwrap();
        assert!(st.success(), "cannot mount a tmpfs on {}", audit.display());
        Some(Mounted(audit.clone()))
    } else {
        // An ordinary user cannot mount one: `cargo xtask test` gives
        // them an empty 1 MiB tmpfs of their own, and the audit
        // directory leads there.
        let tiny = std::env::var_os("SBX_TEST_TINY_DIR").expect(
            "as an ordinary user this test needs SBX_TEST_TINY_DIR, an empty directory of yours on a 1 MiB tmpfs (cargo xtask test makes one)",
        );
        std::fs::create_dir_all(audit.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&tiny, &audit).unwrap();
        None
    };
    let _emptied = Emptied(audit.clone());
    host.ok_in(&ws, &["start", "--name", "full"]);
    let out = host.sh("full", "echo before");
    assert_eq!(text(&out.stdout), "before\n");

    // Anything else fills the disk, to its last byte.
    let filler = audit.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1", "oflag=append", "conv=notrunc"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();

    // A record longer than a page needs room the disk no longer has (a
    // short one could still fit in the log's last page): the exec is
    // refused, and does not run.
    let long = "x".repeat(5000);
    let out = host.sh("full", &format!("echo ran > /workspace/ran # {long}"));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let said = text(&out.stderr);
    assert!(said.contains("failing closed"), "{said}");
    assert!(!ws.join("ran").exists(), "the command ran unrecorded");
    let out = host.sh("full", "echo ran > /workspace/ran");
    assert_ne!(out.status.code(), Some(0), "a later exec went ahead");
    assert!(!ws.join("ran").exists(), "a later command ran unrecorded");

    // Room again: the log still ends with a whole record and verifies.
    std::fs::remove_file(&filler).unwrap();
    let log = audit.join("full.jsonl");
    let verified = host.ok(&["audit", "verify", log.to_str().unwrap()]);
    assert!(verified.starts_with("ok"), "{verified}");
    // The stop cannot be recorded either; the session ends all the same.
    let _ = host.sbx(&["stop", "full"]);
}
