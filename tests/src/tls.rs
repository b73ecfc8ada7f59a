//! HTTPS test servers with a CA of their own, standing in for the internet
//! in the egress tests.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// What each test server answers.
pub const BODY: &str = "hello from the test server\n";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server config with one certificate for all of `names`.
    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .unwrap(),
        )
    }
}

/// Request heads a server received, in order.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTPS server on `bind` that records each request head and answers
/// 200 with [`BODY`]. Connections that never send a head are not recorded.
pub fn https_server(bind: &str, cfg: Arc<ServerConfig>) -> (SocketAddr, Seen) {
    https_server_with(
        bind,
        cfg,
        Arc::new(|_: &str| (200, BODY.as_bytes().to_vec())),
    )
}

/// What a test server answers to a request head: status and body.
pub type Responder = Arc<dyn Fn(&str) -> (u16, Vec<u8>) + Send + Sync>;

/// An HTTPS server on `bind` that records each request head and answers
/// with `respond` (one request per connection).
pub fn https_server_with(
    bind: &str,
    cfg: Arc<ServerConfig>,
    respond: Responder,
) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let (cfg, seen, respond) = (cfg.clone(), s2.clone(), respond.clone());
            std::thread::spawn(move || {
                let mut s = StreamOwned::new(ServerConnection::new(cfg).unwrap(), c);
                let mut r = BufReader::new(&mut s);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                if head.is_empty() {
                    return;
                }
                seen.lock().unwrap().push(head.clone());
                let (status, body) = respond(&head);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
                let _ = s.flush();
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    (addr, seen)
}
