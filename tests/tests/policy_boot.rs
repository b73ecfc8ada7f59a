//! Policy and audit around real boots: the policy refuses before any guest
//! starts, and every boot leaves a verifiable audit log.

use std::process::Command;

use sbx_tests::{require_real_kvm, sbx_bin, text};

fn sbx_in(state: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(sbx_bin())
        .args(args)
        .env("SBX_STATE_DIR", state)
        .output()
        .unwrap()
}

#[test]
fn a_boot_is_audited_end_to_end() {
    require_real_kvm();
    let dir = tempfile::tempdir().unwrap();
    let out = sbx_in(dir.path(), &["boot", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let logs: Vec<_> = std::fs::read_dir(dir.path().join("audit"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(logs.len(), 1);
    let log = logs[0].path();
    let records = sbx_audit::read_records(&log, &mut sbx_audit::Cursor::default()).unwrap();
    let actions: Vec<(&str, Option<&str>)> = records
        .iter()
        .map(|r| (r.event.action.as_str(), r.event.decision.as_deref()))
        .collect();
    assert_eq!(
        actions,
        [
            ("start", None),
            ("start", Some("allow")),
            ("exec", Some("allow")),
            ("stop", None)
        ]
    );
    assert_eq!(records[3].event.details["guest_status"], 3);
    let v = sbx_in(dir.path(), &["audit", "verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v.stdout));
}

#[test]
fn the_policy_refuses_before_the_guest_boots() {
    require_real_kvm();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "[limits]\nvcpus = 2\n\n[[exec]]\nid = \"no-curl\"\naction = \"deny\"\ncommands = [\"curl\"]\n",
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    let out = sbx_in(
        dir.path(),
        &["boot", "--policy", p, "--vcpus", "4", "--", "true"],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("4 vCPUs asked, at most 2 allowed") && err.contains("limits.vcpus"),
        "{err}"
    );
    let out = sbx_in(
        dir.path(),
        &["boot", "--policy", p, "--", "curl", "http://x"],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("rule `no-curl`") && err.contains("p.toml:4"),
        "{err}"
    );
    // Both refusals are in the audit log as denials.
    let ev = sbx_in(dir.path(), &["events", "--decision", "deny"]);
    assert_eq!(text(&ev.stdout).lines().count(), 2, "{}", text(&ev.stdout));
    // An audit log that cannot be written stops the boot before it starts.
    let ro = sbx_in(
        std::path::Path::new("/proc/sbx-no-such-dir"),
        &["boot", "--", "true"],
    );
    assert_eq!(ro.status.code(), Some(125));
    assert!(
        text(&ro.stderr).contains("audit log"),
        "{}",
        text(&ro.stderr)
    );
}

#[test]
fn the_policy_lifetime_ends_the_session() {
    require_real_kvm();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[limits]\nlifetime = \"4s\"\n").unwrap();
    let start = std::time::Instant::now();
    let out = sbx_in(
        dir.path(),
        &[
            "boot",
            "--policy",
            policy.to_str().unwrap(),
            "--",
            "sleep",
            "600",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("after 4 s") && err.contains("limits.lifetime"),
        "{err}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    let ev = sbx_in(dir.path(), &["events", "--json"]);
    let stop = text(&ev.stdout).lines().last().unwrap().to_string();
    assert!(stop.contains("lifetime of 4 s"), "{stop}");
}
