//! `sbx policy`, `sbx audit` and `sbx events` as a user runs them: exit
//! codes, errors that point at the line, signed bundles, tamper detection.

use std::path::Path;
use std::process::{Command, Output};

fn fixtures() -> String {
    format!("{}/../policy/tests/fixtures", env!("CARGO_MANIFEST_DIR"))
}

/// Runs sbx with no discovered policy files and private state.
fn sbx(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbx"))
        .args(args)
        .current_dir(dir)
        .env("SBX_SYSTEM_DIR", dir.join("etc"))
        .env("SBX_CONFIG_DIR", dir.join("config"))
        .env("SBX_STATE_DIR", dir.join("state"))
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn layered(extra: &[&str]) -> Vec<String> {
    let f = fixtures();
    let mut v: Vec<String> = ["org", "team", "project"]
        .iter()
        .flat_map(|l| ["--policy".to_string(), format!("{f}/{l}.toml")])
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(dir: &Path, head: &[&str], tail: &[&str]) -> Output {
    let args: Vec<String> = head
        .iter()
        .map(|s| s.to_string())
        .chain(layered(tail))
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sbx(dir, &refs)
}

#[test]
fn explain_exits_0_allow_1_deny_2_error() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        d.path(),
        &["policy", "explain"],
        &["net", "api.github.com:443"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).starts_with("allow: net api.github.com:443"),
        "{}",
        out(&o)
    );
    let o = run(d.path(), &["policy", "explain"], &["net", "10.1.2.3:443"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let text = out(&o);
    assert!(
        text.contains("org-no-private (org layer,") && text.contains("org.toml:10"),
        "{text}"
    );
    assert!(
        text.contains("team-internal"),
        "the losing allow is listed: {text}"
    );
    let o = run(
        d.path(),
        &["policy", "explain"],
        &["fs", "/workspace/.env", "read", "--json"],
    );
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rule"]["id"], "proj-env");
    assert_eq!(v["rule"]["location"]["line"], 14);
    let o = run(
        d.path(),
        &["policy", "explain"],
        &["mcp", "github.get_issue", "{\"repo\":\"acme/web\"}"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).contains("at most 30 calls per minute"),
        "{}",
        out(&o)
    );
    for bad in [
        vec!["net", "no-port"],
        vec!["mcp", "github", "{}"],
        vec!["mcp", "a.b", "[1]"],
        vec!["fs", "/x", "append"],
    ] {
        let o = run(d.path(), &["policy", "explain"], &bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", out(&o));
    }
}

#[test]
fn check_names_file_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.toml");
    std::fs::write(
        &p,
        "version = 1\n\n[[network]]\naction = \"allow\"\nto = [\"ok.com\", \"bad*.com\"]\n",
    )
    .unwrap();
    let o = sbx(d.path(), &["policy", "check", "p.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out(&o).contains("p.toml:5:17: `bad*.com` is not a valid host"),
        "{}",
        out(&o)
    );
    let f = fixtures();
    let o = sbx(
        d.path(),
        &[
            "policy",
            "check",
            &format!("{f}/org.toml"),
            &format!("{f}/rollout.toml"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).contains("rollout.toml (project layer, audit, 3 rules)"),
        "{}",
        out(&o)
    );
}

#[test]
fn project_policy_is_discovered() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join(".sbx")).unwrap();
    std::fs::write(d.path().join(".sbx/policy.toml"), "preset = \"balanced\"\n").unwrap();
    let o = sbx(d.path(), &["policy", "explain", "net", "pypi.org:443"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let o = sbx(
        d.path(),
        &[
            "policy",
            "explain",
            "--preset",
            "locked-down",
            "net",
            "pypi.org:443",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "--preset wins over the file: {}",
        out(&o)
    );
}

#[test]
fn show_lists_every_rule_with_its_source() {
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), &["policy", "show"], &[]);
    assert_eq!(o.status.code(), Some(0));
    let text = out(&o);
    for want in [
        "/workspace <- /src/proj read-write",
        "vcpus = 4  [team",
        "org-no-smtp",
        "preset:locked-down",
        "any-command",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let o = run(d.path(), &["policy", "show", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), 12 + 7 + 13 + 2);
}

#[test]
fn signed_org_bundles_are_verified() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let o = sbx(dir, &["policy", "keygen", "--out", "org"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let mode = std::fs::metadata(dir.join("org.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(
        sbx(dir, &["policy", "keygen", "--out", "org"])
            .status
            .code(),
        Some(2),
        "never overwrites"
    );
    std::fs::copy(format!("{}/org.toml", fixtures()), dir.join("org.toml")).unwrap();
    let o = sbx(dir, &["policy", "sign", "--key", "org.key", "org.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    // Installed as the machine's org policy with its key trusted: used.
    std::fs::create_dir_all(dir.join("etc/trusted-keys")).unwrap();
    std::fs::copy(dir.join("org.bundle"), dir.join("etc/policy.bundle")).unwrap();
    std::fs::copy(dir.join("org.pub"), dir.join("etc/trusted-keys/org.pub")).unwrap();
    let o = sbx(dir, &["policy", "explain", "net", "10.0.0.1:80"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("org-no-private (org layer, "),
        "{}",
        out(&o)
    );
    // One edited byte: refused, with the reason.
    let b = std::fs::read_to_string(dir.join("org.bundle")).unwrap();
    std::fs::write(
        dir.join("etc/policy.bundle"),
        b.replace("10.0.0.0/8", "11.0.0.0/8"),
    )
    .unwrap();
    let o = sbx(dir, &["policy", "check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out(&o).contains("refused: the signature does not match the policy"),
        "{}",
        out(&o)
    );
    // Signed by a key nobody trusts: refused.
    sbx(dir, &["policy", "keygen", "--out", "rogue"]);
    let o = sbx(
        dir,
        &[
            "policy",
            "sign",
            "--key",
            "rogue.key",
            "org.toml",
            "-o",
            "etc/policy.bundle",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let o = sbx(dir, &["policy", "check"]);
    assert!(
        out(&o).contains("which is not a trusted key"),
        "{}",
        out(&o)
    );
    // And an unsigned org file cannot stand in for the bundle.
    std::fs::remove_file(dir.join("etc/policy.bundle")).unwrap();
    std::fs::copy(dir.join("org.toml"), dir.join("etc/policy.toml")).unwrap();
    let o = sbx(dir, &["policy", "check"]);
    assert!(out(&o).contains("must be a signed bundle"), "{}", out(&o));
}

fn write_log(dir: &Path, session: &str, n: usize) -> std::path::PathBuf {
    let path = dir.join(format!("state/audit/{session}.jsonl"));
    let policy = sbx_policy::Policy::deny_all();
    let log = sbx_audit::AuditLog::open(
        &path,
        sbx_audit::Identity::current(session),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    for i in 0..n {
        let host = sbx_policy::NetHost::Name(format!("h{i}.example"));
        let d = policy.decide_net(&host, None, 443);
        log.decision(
            sbx_policy::Surface::Net,
            "connect",
            &format!("{host}:443"),
            &d,
        )
        .unwrap();
    }
    log.close().unwrap();
    path
}

#[test]
fn audit_verify_names_the_tampered_record() {
    let d = tempfile::tempdir().unwrap();
    let path = write_log(d.path(), "s1", 5);
    let o = sbx(d.path(), &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("5 records"), "{}", out(&o));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("h2.example", "h7.example")).unwrap();
    let o = sbx(d.path(), &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("line 3 (record 3, id s1-3): edited"),
        "{}",
        out(&o)
    );
}

#[test]
fn events_filter_by_session_surface_decision_and_time() {
    let d = tempfile::tempdir().unwrap();
    write_log(d.path(), "s1", 3);
    write_log(d.path(), "s2", 2);
    let lines = |args: &[&str]| {
        let o = sbx(d.path(), args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert_eq!(lines(&["events"]), 5);
    assert_eq!(lines(&["events", "s1"]), 3);
    assert_eq!(
        lines(&["events", "s2", "--decision", "deny", "--surface", "net"]),
        2
    );
    assert_eq!(lines(&["events", "--decision", "allow"]), 0);
    assert_eq!(lines(&["events", "--since", "1h"]), 5);
    assert_eq!(lines(&["events", "--until", "2000-01-01T00:00:00Z"]), 0);
    let o = sbx(d.path(), &["events", "s1", "--json"]);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["rule_id"], "default-deny");
    assert_eq!(first["schema"], "sbx.audit/1");
    let o = sbx(d.path(), &["events", "nope"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(out(&o).contains("no session named `nope`"), "{}", out(&o));
    let o = sbx(d.path(), &["events", "--since", "yesterday"]);
    assert!(out(&o).contains("is not a time"), "{}", out(&o));
}
