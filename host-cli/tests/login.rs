//! `sbx login` against a real `sbx-server` on the loopback: the device-code
//! sign-in, the org and team policy it then applies (with their server
//! versions), a tampered cache refused, and an expired policy failing
//! closed with the server gone.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sbx_tests::server::Server;
use serde_json::{json, Value};

fn sbx(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
    c.current_dir(dir)
        .env("SBX_SYSTEM_DIR", dir.join("etc"))
        .env("SBX_CONFIG_DIR", dir.join("config"))
        .env("SBX_STATE_DIR", dir.join("state"))
        .env("SBX_RUNTIME_DIR", dir.join("run"));
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    sbx(dir).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"no-pastebin\"\naction = \"deny\"\nto = [\"pastebin.com\"]\n\n[delegate]\nteam = [\"network\", \"mcp\"]\nlocal = [\"network\"]\n";
const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"web-api\"\naction = \"allow\"\nto = [\"api.web.example\", \"pastebin.com\"]\nports = [443]\n";

#[test]
fn a_signed_in_machine_applies_its_org_and_team_policy_and_fails_closed_when_it_expires() {
    let d = tempfile::tempdir().unwrap();
    // Bundles that expire 4 s after they are served, for the end.
    let (mut server, t) = signed_in(d.path(), Duration::from_secs(4));
    let admin = &t["admin"];
    server.call(
        "PUT",
        "/api/v1/policy/org",
        admin,
        Value::String(ORG.into()),
    );
    server.call(
        "PUT",
        "/api/v1/policy/teams/web",
        admin,
        Value::String(TEAM.into()),
    );
    let o = run(d.path(), &["login"]);
    assert!(
        text(&o).contains("as bob@acme.example (member, team web) from machine bobs-laptop"),
        "{}",
        text(&o)
    );

    // The org's deny wins over the team's allow; the team's allow applies.
    let o = run(d.path(), &["policy", "explain", "net", "pastebin.com:443"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no-pastebin") && text(&o).contains("org-v1.bundle"),
        "{}",
        text(&o)
    );
    let o = run(
        d.path(),
        &["policy", "explain", "net", "api.web.example:443"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("web-api") && text(&o).contains("team-web-v1.bundle"),
        "{}",
        text(&o)
    );

    let o = run(d.path(), &["policy", "show"]);
    let shown = text(&o);
    assert!(
        shown.contains("org-v1.bundle (signed by")
            && shown.contains(&format!("managed by {}", server.url)),
        "{shown}"
    );
    // What the org delegates, and where it says so.
    assert!(
        shown.contains("team     network, mcp  [") && shown.contains("local    network  ["),
        "{shown}"
    );
    // A project file may add network allows, not exec allows.
    std::fs::create_dir_all(d.path().join(".sbx")).unwrap();
    let project = d.path().join(".sbx/policy.toml");
    std::fs::write(
        &project,
        "[[network]]\naction = \"allow\"\nto = [\"docs.example\"]\n\n[[exec]]\naction = \"allow\"\ncommands = [\"nc\"]\n",
    )
    .unwrap();
    let o = run(d.path(), &["policy", "check"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(".sbx/policy.toml:5")
            && text(&o).contains("local policy may not allow `exec`")
            && text(&o).contains("org-v1.bundle:"),
        "{}",
        text(&o)
    );
    std::fs::remove_file(&project).unwrap();

    // A new version reaches the machine at the next command.
    server.call(
        "PUT",
        "/api/v1/policy/org",
        admin,
        Value::String(ORG.replace("pastebin.com", "pastebin.com\", \"paste.example")),
    );
    let o = run(d.path(), &["policy", "explain", "net", "paste.example:443"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("org-v2.bundle"), "{}", text(&o));

    // A bundle edited in the cache is refused.
    let managed = d.path().join("config/managed");
    let org = managed.join("org-v2.bundle");
    let kept = std::fs::read_to_string(&org).unwrap();
    std::fs::write(
        &org,
        kept.replace("action = \"deny\"", "action = \"allow\""),
    )
    .unwrap();
    server.stop();
    let o = run(d.path(), &["policy", "check"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("changed after it was signed"),
        "{}",
        text(&o)
    );
    std::fs::write(&org, &kept).unwrap();

    // With the server gone, the kept policy serves, with a warning, until
    // it expires; then nothing starts.
    let o = run(d.path(), &["policy", "check"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("using the policy fetched last"),
        "{}",
        text(&o)
    );
    std::thread::sleep(Duration::from_secs(9));
    let o = run(d.path(), &["start", "--name", "late", "--no-workspace"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(
        text(&o).contains("expired") && text(&o).contains("sbx login"),
        "{}",
        text(&o)
    );

    let o = run(d.path(), &["logout"]);
    assert!(text(&o).contains("signed out"), "{}", text(&o));
    assert!(!managed.exists());
}

/// A server (serving bundles valid for `ttl`) with an org admin, team
/// `web` with bob (member) and alice (team admin), team `data` with carol,
/// and this machine signed in as bob.
fn signed_in(d: &Path, ttl: Duration) -> (Server, std::collections::HashMap<&'static str, String>) {
    let (server, setup) = Server::start(&d.join("server"), ttl);
    let mut tokens = std::collections::HashMap::new();
    tokens.insert("admin", server.first_admin(&setup));
    for t in ["web", "data"] {
        server.call(
            "POST",
            "/api/v1/teams",
            &tokens["admin"],
            json!({"name": t}),
        );
    }
    for (name, role, team) in [
        ("bob", "member", "web"),
        ("alice", "team-admin", "web"),
        ("carol", "member", "data"),
    ] {
        let u = server.call(
            "POST",
            "/api/v1/users",
            &tokens["admin"],
            json!({"email": format!("{name}@acme.example"), "role": role, "team": team}),
        );
        tokens.insert(name, u["token"].as_str().unwrap().to_string());
    }
    let mut cmd = sbx(d);
    cmd.args(["login", &server.url, "--machine", "bobs-laptop"]);
    let line = sbx_tests::sign_in(cmd, |code| {
        server.call(
            "POST",
            "/api/v1/device/approve",
            &tokens["bob"],
            json!({"user_code": code}),
        );
    });
    assert!(line.contains(&format!("{}/device", server.url)), "{line}");
    (server, tokens)
}

/// Appends `n` records to session `session`'s log, as a session would.
fn write_records(d: &Path, session: &str, n: usize) {
    let dir = d.join("state/audit");
    std::fs::create_dir_all(&dir).unwrap();
    let log = sbx_audit::AuditLog::open(
        &dir.join(format!("{session}.jsonl")),
        sbx_audit::Identity::current(session),
        Duration::from_secs(1),
    )
    .unwrap();
    for i in 0..n {
        log.record(sbx_audit::Entry::file_changes(
            &format!("change {i}"),
            Value::Null,
        ))
        .unwrap();
    }
    log.close().unwrap();
}

fn server_lines(server: &Server, token: &str, query: &str) -> Vec<Value> {
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/audit?{query}", server.url))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn records_reach_the_server_once_through_an_outage_and_edits_are_flagged() {
    let d = tempfile::tempdir().unwrap();
    let (mut server, t) = signed_in(d.path(), Duration::from_secs(3600));
    write_records(d.path(), "s1", 50);
    let o = run(d.path(), &["audit", "ship"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("50 sent, 50 new"), "{}", text(&o));

    // The server goes away; the log is the spool.
    let addr = server.url.trim_start_matches("http://").to_string();
    server.stop();
    write_records(d.path(), "s1", 30);
    let o = run(d.path(), &["audit", "ship"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot reach"), "{}", text(&o));
    let (server, _) = Server::start_at(&d.path().join("server"), Duration::from_secs(3600), &addr);
    let o = run(d.path(), &["audit", "ship"]);
    assert!(text(&o).contains("30 sent, 30 new"), "{}", text(&o));
    let all = server_lines(&server, &t["admin"], "session=s1");
    let seqs: std::collections::BTreeSet<u64> =
        all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        (all.len(), seqs.len(), seqs.last()),
        (80, 80, Some(&80)),
        "none lost, none twice"
    );
    let o = run(d.path(), &["audit", "ship", "--all"]);
    assert!(
        text(&o).contains("80 sent, 0 new, 80 already held, 0 flagged"),
        "{}",
        text(&o)
    );

    // Who sees what.
    assert_eq!(server_lines(&server, &t["bob"], "session=s1").len(), 80);
    assert_eq!(server_lines(&server, &t["alice"], "").len(), 80);
    assert_eq!(server_lines(&server, &t["carol"], "").len(), 0);
    let page = reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/audit?limit=30", server.url))
        .bearer_auth(&t["admin"])
        .send()
        .unwrap();
    let next = page.headers()["x-next-cursor"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        server_lines(&server, &t["admin"], &format!("after={next}")).len(),
        50
    );

    // An edit, a rewrite and a deletion are flagged, naming machine and record.
    let log = d.path().join("state/audit/s1.jsonl");
    let text_before = std::fs::read_to_string(&log).unwrap();
    let edited = text_before.replacen("change 9\"", "change nine\"", 1);
    assert_ne!(edited, text_before);
    std::fs::write(&log, &edited).unwrap();
    run(d.path(), &["audit", "ship", "--all"]);
    // Deleted before it was shipped: records 81 to 85 never arrive.
    std::fs::write(&log, &text_before).unwrap();
    write_records(d.path(), "s1", 10);
    let full = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = full
        .lines()
        .filter(|l| {
            let seq = serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap();
            !(81..=85).contains(&seq)
        })
        .collect();
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    run(d.path(), &["audit", "ship"]);
    // Rewritten from scratch: another chain at the same places.
    std::fs::remove_file(&log).unwrap();
    std::fs::remove_file(d.path().join("state/audit/s1.shipped")).unwrap();
    write_records(d.path(), "s1", 3);
    run(d.path(), &["audit", "ship", "--all"]);
    let flags = server.call("GET", "/api/v1/audit/flags", &t["admin"], Value::Null);
    let kinds: Vec<(String, u64)> = flags
        .as_array()
        .unwrap()
        .iter()
        .inspect(|f| {
            assert_eq!(
                (f["machine"].as_str(), f["session"].as_str()),
                (Some("bobs-laptop"), Some("s1")),
                "{f}"
            )
        })
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(kinds.contains(&("edited".into(), 10)), "{kinds:?}");
    assert!(kinds.contains(&("gap".into(), 81)), "{kinds:?}");
    assert!(
        kinds.iter().filter(|k| k.0 == "edited" && k.1 <= 3).count() == 3,
        "{kinds:?}"
    );
    assert_eq!(
        reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/audit/flags", server.url))
            .bearer_auth(&t["bob"])
            .send()
            .unwrap()
            .status(),
        403
    );
}
