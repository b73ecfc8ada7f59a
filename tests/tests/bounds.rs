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
