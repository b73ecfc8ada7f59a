//! The control plane against a real guest: a machine signed in to an
//! `sbx-server` (running here, on the nested host's loopback) gets the
//! org's and its team's policy at session start, and a session on it is
//! refused the host the org denies even though the team allows it; its
//! records name the person and the machine as the server knows them.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use sbx_tests::{text, Host};
use serde_json::{json, Value};

const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"org-no-paste\"\naction = \"deny\"\nto = [\"paste.test\"]\n";
const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"team-paste\"\naction = \"allow\"\nto = [\"paste.test\", \"api.web.test\"]\n";

#[test]
fn a_signed_in_machine_runs_sessions_under_the_servers_policy() {
    let host = Host::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let opened = sbx_server::open(sbx_server::Config {
        data: host.dir.path().join("server"),
        bundle_ttl: Duration::from_secs(3600),
        public_url: url.clone(),
    })
    .unwrap();
    let setup = opened.setup_token.clone().unwrap();
    rt.spawn(sbx_server::serve(opened.state, listener));

    let c = reqwest::blocking::Client::new();
    let call = |m: reqwest::Method, path: &str, token: Option<&str>, body: Value| -> Value {
        let mut r = c.request(m, format!("{url}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r = match body {
            Value::String(s) => r.body(s),
            other => r.json(&other),
        };
        let r = r.send().unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().unwrap()
    };
    use reqwest::Method;
    let admin = call(
        Method::POST,
        "/api/v1/setup",
        None,
        json!({"setup_token": setup, "email": "root@acme.example"}),
    );
    let admin = admin["token"].as_str().unwrap().to_string();
    call(
        Method::POST,
        "/api/v1/teams",
        Some(&admin),
        json!({"name": "web"}),
    );
    let bob = call(
        Method::POST,
        "/api/v1/users",
        Some(&admin),
        json!({"email": "bob@acme.example", "role": "member", "team": "web"}),
    );
    let bob = bob["token"].as_str().unwrap().to_string();
    call(
        Method::PUT,
        "/api/v1/policy/org",
        Some(&admin),
        Value::String(ORG.into()),
    );
    call(
        Method::PUT,
        "/api/v1/policy/teams/web",
        Some(&admin),
        Value::String(TEAM.into()),
    );

    let mut login = host
        .cmd(&["login", &url, "--machine", "bobs-laptop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(login.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let code = line
        .split_whitespace()
        .find(|w| w.len() == 9 && w.as_bytes()[4] == b'-')
        .unwrap_or_else(|| panic!("no code in {line:?}"))
        .to_string();
    call(
        Method::POST,
        "/api/v1/device/approve",
        Some(&bob),
        json!({"user_code": code}),
    );
    assert!(login.wait().unwrap().success());

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
    host.ok(&["stop", "m"]);
}
