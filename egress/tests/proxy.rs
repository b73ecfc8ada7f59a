//! The proxy driven from the host's loopback: real sockets, real TLS, a
//! real policy. Test servers stand in for the internet; a test resolver
//! stands in for DNS.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sbx_egress::{Limits, Options, Proxy, Recorder};
use sbx_policy::{Decision, PolicyBuilder, Surface};
use sbx_tests::tls::{self, provider, Seen, TestCa, BODY};

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Recorder for Log {
    fn decision(&self, s: Surface, action: &str, what: &str, d: &Decision<'_>) -> bool {
        self.0.lock().unwrap().push(format!(
            "{s} {action} {what} -> {} {}",
            d.outcome(),
            d.rule.id
        ));
        d.allowed()
    }
}

impl Log {
    fn has(&self, parts: &[&str]) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }
    fn dump(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// An HTTPS server for `name` on the loopback; returns its port.
fn https_server(ca: &TestCa, name: &str) -> (u16, Seen) {
    let (addr, seen) = tls::https_server("127.0.0.1:0", ca.server_config(&[name]));
    (addr.port(), seen)
}

/// A TCP server that echoes what it gets.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut &c, &mut w);
            });
        }
    });
    port
}

struct Setup {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    log: Arc<Log>,
}

fn start(policy: &str, names: &[(&str, &str)], tweak: impl FnOnce(&mut Options)) -> Setup {
    let mut b = PolicyBuilder::new();
    b.add_text("test.toml", policy).unwrap();
    let policy = Arc::new(b.build().unwrap());
    let map: HashMap<String, IpAddr> = names
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect();
    let mut opts = Options::new("test");
    opts.resolver = Some(Arc::new(move |name: &str, port| match map.get(name) {
        Some(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
        None => Err(std::io::Error::other("unknown name")),
    }));
    tweak(&mut opts);
    let log = Arc::new(Log::default());
    let proxy = Proxy::new(policy, log.clone(), opts).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let p = proxy.clone();
    std::thread::spawn(move || p.serve_tcp(l));
    Setup { proxy, addr, log }
}

/// Sends `head` to the proxy; returns the stream and the status line.
fn ask(addr: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    // Consume the rest of the head (and, for refusals, the body).
    let mut all = status.clone();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        all.push_str(&line);
    }
    if !status.contains(" 200 ") {
        let mut body = String::new();
        let _ = r.read_to_string(&mut body);
        all.push_str(&body);
        return (s, all);
    }
    (s, status)
}

fn connect(addr: SocketAddr, target: &str) -> (TcpStream, String) {
    ask(
        addr,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
}

fn policy_with(port: u16, extra: &str) -> String {
    format!(
        r#"
version = 1
[[network]]
id = "test-hosts"
action = "allow"
to = ["allowed.test", "other.test", "loopback.test", "private.test"]
[[network]]
id = "test-servers"
action = "allow"
to = ["127.0.0.1"]
ports = [{port}]
[[network]]
id = "no-evil"
action = "deny"
to = ["evil.test"]
{extra}
"#
    )
}

const NAMES: [(&str, &str); 5] = [
    ("allowed.test", "127.0.0.1"),
    ("other.test", "127.0.0.1"),
    ("loopback.test", "127.0.0.1"),
    ("private.test", "10.0.0.7"),
    ("evil.test", "127.0.0.1"),
];

#[test]
fn connections_are_checked_by_name_and_by_address() {
    let echo = echo_server();
    let s = start(&policy_with(echo, ""), &NAMES, |_| {});
    let (mut c, status) = connect(s.addr, &format!("allowed.test:{echo}"));
    assert!(status.contains(" 200 "), "{status}");
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    for (target, rule, words) in [
        (format!("evil.test:{echo}"), "no-evil", "evil.test"),
        (
            "203.0.113.9:80".to_string(),
            "default-deny",
            "no rule allows",
        ),
        (
            format!("allowed.test:{}", echo.wrapping_add(1).max(1)),
            "non-public-address",
            "loopback",
        ),
        (
            format!("private.test:{echo}"),
            "non-public-address",
            "10.0.0.7, a private address",
        ),
        (
            "unlisted.test:443".to_string(),
            "default-deny",
            "unlisted.test",
        ),
    ] {
        let (_, answer) = connect(s.addr, &target);
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
        assert!(
            answer.contains(&format!("rule `{rule}`")),
            "{target}: {answer}"
        );
        assert!(answer.contains(words), "{target}: {answer}");
        assert!(
            s.log.has(&["net connect", "deny", rule]),
            "{target}\n{}",
            s.log.dump()
        );
    }
    assert!(
        s.log.has(&[
            "net connect allowed.test",
            "(127.0.0.1)",
            "allow test-hosts"
        ]),
        "{}",
        s.log.dump()
    );
}

/// Plain HTTP names its host twice, in the URL (checked) and in `Host`
/// (what a shared front end routes by): they must agree, as inside TLS.
#[test]
fn plain_http_must_carry_the_checked_host() {
    let echo = echo_server();
    let s = start(&policy_with(echo, ""), &NAMES, |_| {});
    let (_, answer) = ask(
        s.addr,
        &format!("GET http://allowed.test:{echo}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("rule `sni-must-match`"), "{answer}");
    assert!(answer.contains("Host: evil.test"), "{answer}");
    assert!(
        s.log.has(&[
            "net request allowed.test (Host evil.test)",
            "deny",
            "sni-must-match"
        ]),
        "{}",
        s.log.dump()
    );
    // The same request naming the checked host (with or without its port)
    // goes through to the server.
    for host in ["allowed.test", &format!("allowed.test:{echo}")] {
        let (_, answer) = ask(
            s.addr,
            &format!("GET http://allowed.test:{echo}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert!(!answer.contains("sni-must-match"), "{host}: {answer}");
    }
}

fn tls_client(roots_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// CONNECTs through the proxy, speaks TLS to `sni` trusting `roots`, and
/// sends one request; returns the whole response or the error.
fn https_get(
    addr: SocketAddr,
    target: &str,
    sni: &str,
    roots: &str,
    request: &str,
) -> Result<String, String> {
    let (c, status) = connect(addr, target);
    if !status.contains(" 200 ") {
        return Err(status);
    }
    let conn = ClientConnection::new(
        tls_client(roots),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut tls = StreamOwned::new(conn, c);
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if !out.is_empty() => Ok(format!("{out}\n(then {e})")),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn secrets_reach_allowed_hosts_only_and_tls_names_must_match() {
    let ca = TestCa::new();
    let (port, seen) = https_server(&ca, "allowed.test");
    let (other_port, other_seen) = https_server(&ca, "other.test");
    let extra = format!(
        r#"
[[network]]
action = "allow"
to = ["127.0.0.1:{other_port}"]
"#
    ) + r#"
[[credential]]
id = "token-to-allowed"
action = "allow"
secret = "TOKEN"
hosts = ["allowed.test"]
[[credential]]
id = "api-key-header"
action = "allow"
secret = "API_KEY"
hosts = ["allowed.test"]
header = "X-Api-Key"
format = "key={secret}"
[[http]]
id = "read-only"
action = "allow"
hosts = ["allowed.test"]
methods = ["GET"]
paths = ["/repos/acme/**"]
"#;
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    ca_file.write_all(ca.pem().as_bytes()).unwrap();
    let ca_path = ca_file.path().to_path_buf();
    let s = start(&policy_with(port, &extra), &NAMES, |o| {
        o.upstream_ca = vec![ca_path];
        o.tls_ports = vec![port, other_port];
        o.secrets = vec![
            ("TOKEN".into(), "TOKEN".into(), "real-token-123".into()),
            ("API_KEY".into(), "API_KEY".into(), "real-key-456".into()),
        ];
    });
    let env: HashMap<String, String> = s.proxy.guest_env().into_iter().collect();
    let token = &env["TOKEN"];
    assert!(token.starts_with("sbx-secret-TOKEN-"));
    let roots = s.proxy.ca_pem();
    let target = format!("allowed.test:{port}");

    let get = |path: &str, method: &str| {
        https_get(
            s.addr,
            &target,
            "allowed.test",
            &roots,
            &format!("{method} {path} HTTP/1.1\r\nHost: allowed.test\r\nAuthorization: Bearer {token}\r\n\r\n"),
        )
    };
    let get_with_host = |host: &str| {
        https_get(
            s.addr,
            &target,
            "allowed.test",
            &roots,
            &format!("GET /repos/acme/x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
        .unwrap()
    };
    assert!(get_with_host(&format!("allowed.test:{port}")).starts_with("HTTP/1.1 200"));
    let ok = get("/repos/acme/x", "GET").unwrap();
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains(BODY), "{ok}");
    let head = seen.lock().unwrap().pop().unwrap();
    assert!(
        head.contains("Authorization: Bearer real-token-123"),
        "{head}"
    );
    assert!(head.contains("X-Api-Key: key=real-key-456"), "{head}");
    assert!(!head.contains("sbx-secret"), "{head}");
    assert!(
        s.log.has(&[
            "credential substitute secret TOKEN to allowed.test",
            "allow token-to-allowed"
        ]),
        "{}",
        s.log.dump()
    );

    let denied = get("/repos/acme/x", "DELETE").unwrap();
    assert!(
        denied.starts_with("HTTP/1.1 403") && denied.contains("default-deny"),
        "{denied}"
    );
    assert!(
        s.log
            .has(&["http request DELETE allowed.test/repos/acme/x", "deny"]),
        "{}",
        s.log.dump()
    );

    // The placeholder sent to another host (through the same server) is exfiltration.
    let other = format!("other.test:{other_port}");
    let ex = https_get(
        s.addr,
        &other,
        "other.test",
        &roots,
        &format!("GET / HTTP/1.1\r\nHost: other.test\r\nCookie: t={token}\r\n\r\n"),
    )
    .unwrap();
    assert!(
        ex.starts_with("HTTP/1.1 403") && ex.contains("secret TOKEN"),
        "{ex}"
    );
    assert!(
        s.log
            .has(&["credential exfiltration secret TOKEN to other.test", "deny"]),
        "{}",
        s.log.dump()
    );
    assert!(other_seen.lock().unwrap().is_empty());

    // In a body too, even split across TLS records.
    let body = format!("x={token}");
    let req = format!(
        "POST / HTTP/1.1\r\nHost: other.test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let ex = https_get(s.addr, &other, "other.test", &roots, &req).unwrap();
    assert!(ex.starts_with("HTTP/1.1 403"), "{ex}");
    assert!(s
        .log
        .has(&["credential exfiltration secret TOKEN to other.test"]));
    // The head went ahead of the body; the placeholder did not.
    let heads = other_seen.lock().unwrap().clone();
    assert!(heads.iter().all(|h| !h.contains("sbx-secret")), "{heads:?}");

    // Inside the checked tunnel, a Host naming another site is refused.
    let fronted = get_with_host("evil.test");
    assert!(
        fronted.starts_with("HTTP/1.1 403") && fronted.contains("sni-must-match"),
        "{fronted}"
    );

    // SNI that differs from the CONNECT target: refused before any byte goes upstream.
    let before = seen.lock().unwrap().len();
    let err = https_get(
        s.addr,
        &target,
        "evil.test",
        &roots,
        "GET / HTTP/1.1\r\n\r\n",
    )
    .unwrap_err();
    assert!(err.to_lowercase().contains("access"), "{err}");
    assert!(
        s.log
            .has(&["net tls allowed.test", "SNI evil.test", "sni-must-match"]),
        "{}",
        s.log.dump()
    );
    assert_eq!(seen.lock().unwrap().len(), before);

    // Plain HTTP never carries a secret, even to its allowed host.
    let (_, plain) = ask(
        s.addr,
        &format!("GET http://allowed.test:{port}/repos/acme/x HTTP/1.1\r\nAuthorization: {token}\r\n\r\n"),
    );
    assert!(
        plain.starts_with("HTTP/1.1 403") && plain.contains("secrets-need-tls"),
        "{plain}"
    );
}

#[test]
fn malformed_huge_and_slow_clients_do_not_take_the_proxy_down() {
    let echo = echo_server();
    let s = start(&policy_with(echo, ""), &NAMES, |o| {
        o.limits = Limits {
            head_time: Duration::from_secs(2),
            max_connections: 64,
            ..Limits::default()
        };
    });
    for bad in [
        "CONNECT\r\n\r\n",
        "CONNECT allowed.test HTTP/1.1\r\n\r\n",
        "CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "\x16\x03\x01\x00\x05hello\r\n\r\n",
        "GET http://a b/ HTTP/1.1\r\n\r\n",
    ] {
        let (_, answer) = ask(s.addr, bad);
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad:?}: {answer}");
    }
    let huge = format!(
        "CONNECT allowed.test:{echo} HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let mut c = TcpStream::connect(s.addr).unwrap();
    let _ = c.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Forty clients that trickle their heads, and more that send nothing.
    let mut slow = Vec::new();
    for i in 0..40 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(b"CONNECT allowed.test:").unwrap();
        if i % 2 == 0 {
            slow.push(std::thread::spawn(move || {
                for _ in 0..5 {
                    std::thread::sleep(Duration::from_millis(400));
                    if c.write_all(b"1").is_err() {
                        break;
                    }
                }
                let mut rest = String::new();
                let _ = c.read_to_string(&mut rest);
                rest
            }));
        } else {
            slow.push(std::thread::spawn(move || {
                let mut rest = String::new();
                let _ = c.read_to_string(&mut rest);
                rest
            }));
        }
    }
    // Meanwhile a well-behaved client is served at once.
    let t = Instant::now();
    let (mut c, status) = connect(s.addr, &format!("allowed.test:{echo}"));
    assert!(status.contains(" 200 "), "{status}");
    c.write_all(b"pong").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The slow ones are cut off at the head deadline with 408.
    for h in slow {
        let rest = h.join().unwrap();
        assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
    }
    let (_, status) = connect(s.addr, &format!("allowed.test:{echo}"));
    assert!(status.contains(" 200 "), "{status}");
}

#[test]
fn a_full_session_answers_503_and_recovers() {
    let echo = echo_server();
    let s = start(&policy_with(echo, ""), &NAMES, |o| {
        o.limits = Limits {
            head_time: Duration::from_secs(1),
            max_connections: 4,
            ..Limits::default()
        };
    });
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (_, answer) = connect(s.addr, &format!("allowed.test:{echo}"));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    std::thread::sleep(Duration::from_millis(1500));
    let (_, status) = connect(s.addr, &format!("allowed.test:{echo}"));
    assert!(status.contains(" 200 "), "{status}");
    drop(idle);
}
