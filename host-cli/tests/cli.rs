//! The `sbx` binary on this host, whatever its KVM: doctor's verdicts and the
//! refusal to boot where standard guests cannot run.

use std::path::Path;
use std::process::Command;

fn sbx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sbx"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn on_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        && !Path::new("/sys/module/kvm_amd").exists()
        && !Path::new("/sys/module/kvm_intel").exists()
}

#[test]
fn doctor_names_the_kvm_provider() {
    let out = sbx(&["doctor"]);
    let stdout = text(&out.stdout);
    if on_pvm_host() {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("kvm_pvm"), "{stdout}");
        assert!(stdout.contains("nested test host"), "{stdout}");
    } else if Path::new("/sys/module/kvm_amd").exists() {
        assert!(stdout.contains("kvm_amd"), "{stdout}");
    } else if Path::new("/sys/module/kvm_intel").exists() {
        assert!(stdout.contains("kvm_intel"), "{stdout}");
    }
}

#[test]
fn doctor_without_kvm_fails_with_a_next_step() {
    let out = sbx(&["doctor", "--kvm", "/nonexistent/kvm"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("/nonexistent/kvm does not exist"),
        "{stdout}"
    );
    assert!(stdout.contains("next: enable VT-x/AMD-V"), "{stdout}");
    let json = sbx(&["doctor", "--json", "--kvm", "/nonexistent/kvm"]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["ready"], false);
    assert_eq!(doc["host"]["access"]["state"], "missing");
}

#[test]
fn boot_refuses_on_kvm_pvm_naming_the_nested_host() {
    if !on_pvm_host() {
        return; // only meaningful where /dev/kvm is kvm_pvm
    }
    let out = sbx(&["boot", "--", "true"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("kvm_pvm") && err.contains("nested test host"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn boot_without_kvm_is_one_clear_line() {
    let out = sbx(&["boot", "--kvm", "/nonexistent/kvm", "--", "true"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err.starts_with("sbx: /nonexistent/kvm does not exist"),
        "{err}"
    );
}

#[test]
fn help_teaches_with_examples() {
    let out = sbx(&["boot", "--help"]);
    let help = text(&out.stdout);
    assert!(
        help.contains("Examples:") && help.contains("sbx boot -- uname -a"),
        "{help}"
    );
    assert!(help.contains("Exit status"), "{help}");
    let top = text(&sbx(&["--help"]).stdout);
    assert!(top.contains("doctor") && top.contains("boot"), "{top}");
}

/// Guest-chosen text (here a file name with a newline, a forged record and
/// terminal escapes) is escaped for people and exact for programs.
#[test]
fn events_show_guest_text_as_data() {
    use sbx_audit::{AuditLog, Entry, Identity, RuleCite};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    let name =
        "/workspace/x\n2026-01-01T00:00:00Z  s  decision net allow FORGED\x1b[2J\x1b]0;pwned\x07";
    let log = AuditLog::open(
        &path,
        Identity::current("s"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let rule = RuleCite {
        id: "deny-env",
        layer: "team",
        location: Some("policy.toml:3"),
    };
    log.record(Entry::fs_denied("lookup", name, &rule, "secret"))
        .unwrap();
    log.close().unwrap();
    let file = path.to_str().unwrap();

    let out = sbx(&["events", "--file", file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert_eq!(shown.lines().count(), 1, "{shown}");
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{shown:?}"
    );
    assert!(
        shown.contains("/workspace/x\\n2026-01-01T00:00:00Z") && shown.contains("\\x1b[2J"),
        "{shown}"
    );

    let out = sbx(&["events", "--file", file, "--json"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["resource"], name);
}
