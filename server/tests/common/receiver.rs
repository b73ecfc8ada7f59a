//! A webhook or collector receiver on the loopback, for the tests of
//! what the server sends out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a receiver got: its path, headers (lowercase names) and body.
#[derive(Clone, Debug)]
pub struct Got {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A listener on the loopback whose connections `serve` takes, one at a
/// time, until stopped.
pub struct Listening {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listening {
    fn start(addr: &str, serve: impl Fn(TcpStream) + Send + 'static) -> Listening {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn);
                }
            }
        });
        Listening {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops listening: the port refuses connections until restarted.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// A webhook receiver on the loopback that answers 200 to every POST.
pub struct Receiver;

impl Receiver {
    pub fn start(addr: &str, got: Arc<Mutex<Vec<Got>>>) -> Listening {
        Listening::start(addr, move |conn| {
            if let Some(r) = read_request(conn) {
                got.lock().unwrap().push(r);
            }
        })
    }
}

fn read_request(conn: TcpStream) -> Option<Got> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    let path = first.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let mut w = conn;
    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .ok()?;
    Some(Got {
        path,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

pub fn header<'a>(g: &'a Got, name: &str) -> &'a str {
    g.headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Waits up to `secs` for the receiver to hold `n` requests on `path`.
pub fn wait_for(got: &Arc<Mutex<Vec<Got>>>, path: &str, n: usize, secs: u64) -> Vec<Got> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let on: Vec<Got> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect();
        if on.len() >= n || Instant::now() > deadline {
            return on;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A syslog receiver speaking TLS (RFC 5425) on the loopback with the
/// certificate in `dir` (see `sbx_server::testing::localhost_certificates`):
/// every message it reads, in order.
pub struct SyslogReceiver;

impl SyslogReceiver {
    pub fn start(addr: &str, dir: &std::path::Path, got: Arc<Mutex<Vec<String>>>) -> Listening {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server.crt"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        Listening::start(addr, move |mut tcp| {
            let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut bytes = Vec::new();
            let _ = rustls::Stream::new(&mut tls, &mut tcp).read_to_end(&mut bytes);
            got.lock().unwrap().extend(frames(&bytes));
        })
    }
}

/// RFC 5425's octet-counted frames: `LEN SP MSG`, one after another.
fn frames(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(sp) = bytes.iter().position(|b| *b == b' ') {
        let Some(len) = std::str::from_utf8(&bytes[..sp])
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
        else {
            break;
        };
        let Some(msg) = bytes.get(sp + 1..sp + 1 + len) else {
            break;
        };
        out.push(String::from_utf8_lossy(msg).into_owned());
        bytes = &bytes[sp + 1 + len..];
    }
    out
}
