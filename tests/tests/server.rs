//! The control plane against a real guest: a machine signed in to an
//! `sbx-server` (running here, on the nested host's loopback) gets the
//! org's and its team's policy at session start, and a session on it is
//! refused the host the org denies even though the team allows it; its
//! records name the person and the machine as the server knows them.

use std::time::Duration;

use sbx_tests::server::Server;
use sbx_tests::{text, Host};
use serde_json::{json, Value};

const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"org-no-paste\"\naction = \"deny\"\nto = [\"paste.test\"]\n";
const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"team-paste\"\naction = \"allow\"\nto = [\"paste.test\", \"api.web.test\"]\n";

#[test]
fn a_signed_in_machine_runs_sessions_under_the_servers_policy() {
    let host = Host::new();
    let data = host.dir.path().join("server");
    let (mut server, setup) = Server::start(&data, Duration::from_secs(3600));
    let url = server.url.clone();
    let admin = server.first_admin(&setup);
    server.call("POST", "/api/v1/teams", &admin, json!({"name": "web"}));
    let bob = server.call(
        "POST",
        "/api/v1/users",
        &admin,
        json!({"email": "bob@acme.example", "role": "member", "team": "web"}),
    );
    let bob = bob["token"].as_str().unwrap().to_string();
    server.call(
        "PUT",
        "/api/v1/policy/org",
        &admin,
        Value::String(ORG.into()),
    );
    server.call(
        "PUT",
        "/api/v1/policy/teams/web",
        &admin,
        Value::String(TEAM.into()),
    );
    sbx_tests::sign_in(
        host.cmd(&["login", &url, "--machine", "bobs-laptop"]),
        |code| {
            server.call(
                "POST",
                "/api/v1/device/approve",
                &bob,
                json!({"user_code": code}),
            );
        },
    );

    host.ok(&["start", "--name", "m", "--no-workspace"]);
    let out = host.sh("m", "curl -sS --max-time 20 http://paste.test/");
    let body = text(&out.stdout);
    assert!(
        body.contains("rule `org-no-paste`"),
        "{body}{}",
        text(&out.stderr)
    );
    assert!(body.contains("org-v1.bundle"), "{body}");
    let events = host.events("m");
    let start = events.iter().find(|e| e["action"] == "start").unwrap();
    assert_eq!(start["user"], "bob@acme.example");
    assert_eq!(start["host"], "bobs-laptop");
    assert_eq!(start["details"]["team"], "web");
    let denied = events
        .iter()
        .find(|e| e["rule_id"] == "org-no-paste")
        .unwrap_or_else(|| panic!("no decision by the org rule: {events:#?}"));
    assert_eq!(denied["layer"], "org");

    // The records reach the server: the session ships its own as it runs.
    let c = reqwest::blocking::Client::new();
    let count = |session: &str| -> usize {
        let r = c
            .get(format!("{url}/api/v1/audit?session={session}&limit=10000"))
            .bearer_auth(&admin)
            .send()
            .unwrap();
        let lines: Vec<Value> = r
            .text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seqs: std::collections::BTreeSet<u64> =
            lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs.len(), lines.len(), "a record twice on the server");
        lines.len()
    };
    let local = |session: &str| -> usize {
        std::fs::read_to_string(host.dir.path().join(format!("state/audit/{session}.jsonl")))
            .unwrap()
            .lines()
            .count()
    };
    let shipped = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        count("m") >= local("m")
    });
    assert!(
        shipped,
        "the running session's records did not reach the server: {} of {}",
        count("m"),
        local("m")
    );

    // The dashboard shows this real session to bob: the refusal links to
    // the line of the org policy version that made it.
    let nc = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = nc
        .post(format!("{url}/ui/signin"))
        .form(&[("token", bob.as_str())])
        .send()
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = nc
        .get(format!("{url}/ui/sessions/bobs-laptop/m"))
        .header("cookie", &cookie)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        page.contains("paste.test") && page.contains("/ui/policy/org?v=1#L"),
        "{page}"
    );
    assert!(page.contains("Chain intact"), "{page}");
    host.ok(&["stop", "m"]);

    // A second session; the server goes away; the session is killed mid-stream.
    host.ok(&["start", "--name", "m2", "--no-workspace"]);
    host.sh("m2", "true");
    let addr = url.trim_start_matches("http://").to_string();
    server.stop();
    for i in 0..5 {
        host.sh("m2", &format!("echo {i}"));
    }
    let pid = host.session("m2")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kills the session process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    (server, _) = Server::start_at(&data, Duration::from_secs(3600), &addr);
    let o = host.sbx(&["audit", "ship"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    for s in ["m", "m2"] {
        assert_eq!(count(s), local(s), "session {s}: every record once");
    }
    server.stop();
}
