//! One session's proxy: limits, the CONNECT and plain-HTTP paths, and the
//! decisions each connection needs.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, ServerConnection, StreamOwned};
use rustls_pki_types::ServerName;
use sbx_policy::{parse_host_port, NetHost, Policy, Surface};

use crate::gate::{deny, names, Builtins, Gate, Limits, Recorder, Refusal, Target};
use crate::head::{self, Head, HeadError};
use crate::http;
use crate::mitm::{self, Authority, TlsError};
use crate::secrets::Secrets;
use crate::sni::{self, HelloError};
use crate::stream::{self, Prefixed, Stream};

/// Ports on which a CONNECT must carry TLS whose server name matches,
/// unless the options name others.
pub const TLS_PORTS: [u16; 2] = [443, 8443];

/// Looks a name up on the host.
pub type Resolver = Arc<dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// Resource name of requests refused before their target is known.
const MALFORMED: &str = "malformed request";

pub struct Options {
    /// Names the session's CA.
    pub session: String,
    pub limits: Limits,
    /// PEM files trusted for upstream TLS besides the system roots.
    pub upstream_ca: Vec<PathBuf>,
    /// `(name, guest env var, value)` of each secret the session may use.
    pub secrets: Vec<(String, String, String)>,
    /// The system resolver when None.
    pub resolver: Option<Resolver>,
    /// Ports whose CONNECTs must carry TLS (and may be intercepted).
    pub tls_ports: Vec<u16>,
}

impl Options {
    pub fn new(session: &str) -> Options {
        Options {
            session: session.to_string(),
            limits: Limits::default(),
            upstream_ca: Vec::new(),
            secrets: Vec::new(),
            resolver: None,
            tls_ports: TLS_PORTS.to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot make secret placeholders: {0}")]
    Random(getrandom::Error),
}

pub struct Proxy {
    gate: Gate,
    authority: Authority,
    upstream: Arc<ClientConfig>,
    resolver: Resolver,
    tls_ports: Vec<u16>,
    active: AtomicUsize,
}

struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn system_resolver() -> Resolver {
    Arc::new(|name, port| Ok((name, port).to_socket_addrs()?.collect()))
}

impl Proxy {
    pub fn new(
        policy: Arc<Policy>,
        recorder: Arc<dyn Recorder>,
        opts: Options,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let extra: Vec<&std::path::Path> = opts.upstream_ca.iter().map(PathBuf::as_path).collect();
        Ok(Arc::new(Proxy {
            gate: Gate {
                policy,
                recorder,
                secrets: Secrets::new(opts.secrets).map_err(ProxyError::Random)?,
                builtins: Builtins::new(),
                limits: opts.limits,
            },
            authority: Authority::new(&opts.session)?,
            upstream: mitm::upstream_config(&extra)?,
            resolver: opts.resolver.unwrap_or_else(system_resolver),
            tls_ports: opts.tls_ports,
            active: AtomicUsize::new(0),
        }))
    }

    /// The session CA's certificate, for the guest's trust store.
    pub fn ca_pem(&self) -> String {
        self.authority.cert_pem()
    }

    /// The guest environment that carries the placeholders.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.gate
            .secrets
            .iter()
            .map(|s| (s.env.clone(), s.placeholder.clone()))
            .collect()
    }

    /// Serves `client` on a thread of its own, or answers 503 when the
    /// session already has as many connections as it may.
    pub fn spawn(self: &Arc<Self>, client: Stream) {
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.gate.limits.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            let mut client = client;
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            Refusal::new(
                503,
                format!(
                    "sbx egress proxy: this session already has {} connections open\n",
                    self.gate.limits.max_connections
                ),
            )
            .send(&mut client);
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("egress".into())
            .spawn(move || {
                let _slot = Slot(&me.active);
                me.serve(client);
            });
        if spawned.is_err() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Accepts connections on `listener` until it fails (for driving the
    /// proxy from the host: tests and benchmarks).
    pub fn serve_tcp(self: &Arc<Self>, listener: std::net::TcpListener) {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_nodelay(true);
            self.spawn(Stream::Tcp(conn));
        }
    }

    /// Serves one client connection to its end.
    pub fn serve(&self, mut client: Stream) {
        let raw = match head::read(
            &mut client,
            |c, d| c.set_read_timeout(Some(d)),
            self.gate.limits.head_bytes,
            self.gate.limits.head_time,
        ) {
            Ok(r) => r,
            Err(HeadError::Closed | HeadError::Io(_)) => return,
            Err(e) => {
                let code = e.status();
                return self.gate.refuse_protocol(
                    &mut client,
                    MALFORMED,
                    code,
                    format!("request head: {e}"),
                );
            }
        };
        let req = match Head::parse_request(&raw.bytes) {
            Ok(r) => r,
            Err(e) => {
                return self.gate.refuse_protocol(
                    &mut client,
                    MALFORMED,
                    400,
                    format!("request head: {e}"),
                )
            }
        };
        let _ = client.set_read_timeout(None);
        if req.first.eq_ignore_ascii_case("CONNECT") {
            match parse_host_port(&req.second) {
                Ok((host, port)) => self.connect(client, host, port, raw.rest),
                Err(e) => self.gate.refuse_protocol(
                    &mut client,
                    MALFORMED,
                    400,
                    format!("CONNECT target: {e}"),
                ),
            }
        } else {
            self.plain(client, req, raw.rest)
        }
    }

    /// Checks a destination at its name, resolves it on the host, checks
    /// each address, and connects to the first allowed one.
    fn dial(&self, host: &NetHost, port: u16) -> Result<TcpStream, Refusal> {
        let what = format!("{host}:{port}");
        let d = self.gate.policy.decide_net(host, None, port);
        // A denied name is not even looked up: lookups leak too.
        if !d.allowed() {
            self.gate.record(Surface::Net, "connect", &what, &d);
            return Err(Refusal::policy(&format!("a connection to {what}"), &d));
        }
        let addrs: Vec<IpAddr> = match host {
            NetHost::Ip(ip) => vec![*ip],
            NetHost::Name(n) => match (self.resolver)(n, port) {
                Ok(a) if !a.is_empty() => a.into_iter().map(|a| a.ip()).collect(),
                Ok(_) | Err(_) => {
                    return Err(Refusal::new(
                        502,
                        format!("sbx egress proxy: cannot resolve {n} on the host\n"),
                    ))
                }
            },
        };
        let mut denied = None;
        let mut failed = None;
        for addr in addrs {
            let d = self.gate.policy.decide_connect(host, addr, port);
            let at = format!("{what} ({addr})");
            if !d.allowed() {
                denied.get_or_insert((d, at));
                continue;
            }
            if !self.gate.record(Surface::Net, "connect", &at, &d) {
                return Err(Refusal::new(
                    503,
                    "sbx egress proxy: the audit log cannot record this connection\n".into(),
                ));
            }
            // Connect to exactly the address that was checked: no second lookup.
            match TcpStream::connect_timeout(
                &SocketAddr::new(addr, port),
                self.gate.limits.connect_time,
            ) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(self.gate.limits.response_time));
                    return Ok(s);
                }
                Err(e) => failed = Some(format!("{at}: {e}")),
            }
        }
        match (denied, failed) {
            (_, Some(e)) => Err(Refusal::new(
                502,
                format!("sbx egress proxy: cannot connect to {e}\n"),
            )),
            (Some((d, at)), None) => {
                self.gate.record(Surface::Net, "connect", &at, &d);
                Err(Refusal::policy(&format!("a connection to {at}"), &d))
            }
            (None, None) => Err(Refusal::new(
                502,
                format!("sbx egress proxy: no address for {what}\n"),
            )),
        }
    }

    fn intercepts(&self, host: &NetHost) -> bool {
        !self.gate.policy.passthrough(host)
            && (!self.gate.secrets.is_empty() || self.gate.policy.restricts_http(host))
    }

    fn connect(&self, mut client: Stream, host: NetHost, port: u16, rest: Vec<u8>) {
        let mut upstream = match self.dial(&host, port) {
            Ok(s) => s,
            Err(r) => return r.send(&mut client),
        };
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
        let mut prefix = rest;
        if self.tls_ports.contains(&port) {
            let _ = client.set_read_timeout(Some(self.gate.limits.head_time));
            let hello = match sni::read_hello(&mut client, prefix) {
                Ok(h) => h,
                Err(HelloError::Io(_)) => return,
                Err(e) => {
                    let d = deny(
                        &self.gate.builtins.sni,
                        format!("port {port} carries TLS and {e}"),
                    );
                    self.gate
                        .record(Surface::Net, "tls", &format!("{host}:{port}"), &d);
                    let _ = client.write_all(&sni::ACCESS_DENIED);
                    return;
                }
            };
            let _ = client.set_read_timeout(None);
            let matches = match (&host, &hello.sni) {
                (NetHost::Name(_), Some(s)) => names(&host, s),
                (NetHost::Ip(_), None) => true,
                _ => false,
            };
            if !matches {
                let named = hello.sni.as_deref().unwrap_or("no server name");
                let d = deny(
                    &self.gate.builtins.sni,
                    format!("CONNECT {host}:{port} carried a TLS ClientHello for {named}"),
                );
                self.gate.record(
                    Surface::Net,
                    "tls",
                    &format!("{host}:{port} (SNI {named})"),
                    &d,
                );
                let _ = client.write_all(&sni::ACCESS_DENIED);
                return;
            }
            if self.intercepts(&host) {
                return self.intercept(client, hello.raw, upstream, host, port);
            }
            prefix = hello.raw;
        }
        if upstream.write_all(&prefix).is_err() {
            return;
        }
        let _ = upstream.set_read_timeout(None);
        let _ = stream::join(client, Stream::Tcp(upstream));
    }

    fn intercept(
        &self,
        client: Stream,
        hello: Vec<u8>,
        upstream: TcpStream,
        host: NetHost,
        port: u16,
    ) {
        let name = match &host {
            NetHost::Name(n) => n.clone(),
            NetHost::Ip(ip) => ip.to_string(),
        };
        let (server, server_name) = match (
            self.authority.server_config(&name),
            ServerName::try_from(name.clone()),
        ) {
            (Ok(s), Ok(n)) => (s, n),
            (Err(e), _) => return tracing::warn!("cannot intercept {name}: {e}"),
            (_, Err(e)) => return tracing::warn!("cannot intercept {name}: {e}"),
        };
        let (Ok(down), Ok(up)) = (
            ServerConnection::new(server),
            ClientConnection::new(self.upstream.clone(), server_name),
        ) else {
            return;
        };
        let mut down = StreamOwned::new(down, Prefixed::new(hello, client));
        let mut up = StreamOwned::new(up, upstream);
        let raw = match head::read(
            &mut down,
            |s, d| s.sock.inner.set_read_timeout(Some(d)),
            self.gate.limits.head_bytes,
            self.gate.limits.head_time,
        ) {
            Ok(r) => r,
            // Most often the client does not trust the session CA.
            Err(HeadError::Io(e)) => return tracing::debug!("TLS from the guest to {name}: {e}"),
            Err(HeadError::Closed) => return,
            Err(e) => {
                let (what, code) = (format!("{host}:{port}"), e.status());
                return self.gate.refuse_protocol(
                    &mut down,
                    &what,
                    code,
                    format!("request head: {e}"),
                );
            }
        };
        let _ = down.sock.inner.set_read_timeout(None);
        let target = Target {
            host,
            port,
            tls: true,
        };
        match Head::parse_request(&raw.bytes) {
            Ok(req) => http::exchange(&self.gate, &target, req, raw.rest, &mut down, &mut up),
            Err(e) => {
                let what = format!("{}:{}", target.host, target.port);
                self.gate
                    .refuse_protocol(&mut down, &what, 400, format!("request head: {e}"))
            }
        }
        down.conn.send_close_notify();
        let _ = down.flush();
    }

    fn plain(&self, mut client: Stream, mut req: Head, rest: Vec<u8>) {
        let url = match url::Url::parse(&req.second) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some() => u,
            Ok(u) if u.scheme() == "https" => {
                return self.gate.refuse_protocol(
                    &mut client,
                    MALFORMED,
                    400,
                    "https:// URLs go through CONNECT; send CONNECT host:443 (set HTTPS_PROXY)".into(),
                )
            }
            _ => {
                return self.gate.refuse_protocol(
                    &mut client,
                    MALFORMED,
                    400,
                    format!(
                        "this is a forward proxy: the request target must be an absolute http:// URL, not {:?}",
                        req.second
                    ),
                )
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return self.gate.refuse_protocol(
                &mut client,
                MALFORMED,
                400,
                "credentials in the URL are refused; use a secret".into(),
            );
        }
        let host_text = url.host_str().unwrap_or_default();
        let host = match sbx_policy::normalize_host(host_text) {
            Ok(h) => h,
            Err(e) => {
                return self
                    .gate
                    .refuse_protocol(&mut client, MALFORMED, 400, e.to_string())
            }
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let mut origin = url.path().to_string();
        if let Some(q) = url.query() {
            origin.push('?');
            origin.push_str(q);
        }
        req.second = origin;
        if req.get("host").is_none() {
            req.set("Host", format!("{host_text}:{port}").into_bytes());
        }
        let mut upstream = match self.dial(&host, port) {
            Ok(s) => s,
            Err(r) => return r.send(&mut client),
        };
        let target = Target {
            host,
            port,
            tls: false,
        };
        http::exchange(&self.gate, &target, req, rest, &mut client, &mut upstream);
    }
}
