//! One request through the proxy where it can read HTTP: plain HTTP, and
//! HTTPS it intercepts. Request rules are checked, placeholders are swapped
//! for secrets only on the hosts their rules allow (and found anywhere else,
//! refused as exfiltration), and exactly one request and its response pass.

use std::io::{self, BufReader, Read, Write};

use sbx_policy::{Injection, NetHost, Surface};

use crate::body;
use crate::head::{self, Head, HeadError};
use crate::proxy::{deny, names, Proxy, Refusal};
use crate::secrets::{self, BodyScanner, Secret};
use crate::stream::Prefixed;

pub(crate) struct Target {
    pub host: NetHost,
    pub port: u16,
    /// Whether the guest's side is TLS (intercepted); secrets only go there.
    pub tls: bool,
}

/// Headers that describe one hop, not the request.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "upgrade",
    "expect",
];

impl Proxy {
    /// May `s`'s placeholder go to this target? Records the decision under
    /// `action` and returns the refusal when it may not.
    fn secret_check(&self, t: &Target, s: &Secret, action: &str) -> Result<(), Refusal> {
        let what = format!("secret {} to {}", s.name, t.host);
        let (d, _) = self.policy.decide_credential(&s.name, &t.host);
        let d = if d.allowed() && !t.tls {
            deny(
                &self.builtins.plain_secret,
                format!("{what} over plain HTTP would send it in clear text"),
            )
        } else {
            d
        };
        let action = if d.allowed() { action } else { "exfiltration" };
        if self.record(Surface::Credential, action, &what, &d) {
            Ok(())
        } else {
            Err(Refusal::policy(
                &format!("the placeholder of secret {} sent to {}", s.name, t.host),
                &d,
            ))
        }
    }

    /// Applies request rules and secrets to the head; the refusal to send
    /// back if the request may not go.
    fn check_request(&self, t: &Target, req: &mut Head) -> Result<(), Refusal> {
        // Inside a checked tunnel, a Host header naming another site would
        // have a shared front end (a CDN) route the request there.
        if t.tls {
            if let Some(h) = req.get("host") {
                let text = String::from_utf8_lossy(h).into_owned();
                let named = text
                    .rsplit_once(':')
                    .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty())
                    .map_or(text.as_str(), |(h, _)| h);
                if !names(&t.host, named) {
                    let d = deny(
                        &self.builtins.sni,
                        format!("a request to {} carried Host: {text}", t.host),
                    );
                    self.record(
                        Surface::Net,
                        "request",
                        &format!("{} (Host {text})", t.host),
                        &d,
                    );
                    return Err(Refusal::policy("the request", &d));
                }
            }
        }
        let path = req.second.split('?').next().unwrap_or_default().to_string();
        if let Some(d) = self.policy.decide_http(&t.host, &req.first, &path) {
            let what = format!("{} {}{path}", req.first, t.host);
            if !self.record(Surface::Http, "request", &what, &d) {
                return Err(Refusal::policy(&what, &d));
            }
        }
        if self.secrets.is_empty() {
            return Ok(());
        }
        let mut seen = req.second.as_bytes().to_vec();
        for (_, v) in &req.headers {
            seen.extend_from_slice(v);
            seen.push(b'\n');
        }
        for s in self.secrets.found_in(&seen) {
            self.secret_check(t, s, "substitute")?;
            let (from, to) = (s.placeholder.as_bytes(), s.value().as_bytes());
            req.second =
                String::from_utf8_lossy(&secrets::replace(req.second.as_bytes(), from, to))
                    .into_owned();
            for (_, v) in req.headers.iter_mut() {
                *v = secrets::replace(v, from, to);
            }
        }
        if t.tls {
            for s in self.secrets.iter() {
                let (d, grant) = self.policy.decide_credential(&s.name, &t.host);
                let Some(Injection::Header { name, format }) = grant.map(|g| &g.injection) else {
                    continue;
                };
                if d.allowed()
                    && self.record(
                        Surface::Credential,
                        "inject",
                        &format!("secret {} to {} as {name}", s.name, t.host),
                        &d,
                    )
                {
                    req.set(name, format.replace("{secret}", s.value()).into_bytes());
                }
            }
        }
        Ok(())
    }
}

fn bad_gateway(client: &mut impl Write, what: &str, e: impl std::fmt::Display) {
    Refusal::new(502, format!("sbx egress proxy: {what}: {e}\n")).send(client);
}

/// Carries one request from `client` to `upstream` and its response back.
pub(crate) fn exchange<C: Read + Write, U: Read + Write>(
    proxy: &Proxy,
    t: &Target,
    mut req: Head,
    rest: Vec<u8>,
    client: &mut C,
    upstream: &mut U,
) {
    if let Err(r) = proxy.check_request(t, &mut req) {
        return r.send(client);
    }
    let framing = match body::request(&req) {
        Ok(f) => f,
        Err(why) => {
            let what = format!("{}:{}", t.host, t.port);
            return proxy.refuse_protocol(client, &what, 403, format!("a request with {why}"));
        }
    };
    let expects = req
        .get("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case(b"100-continue"));
    for h in HOP_BY_HOP {
        req.remove(h);
    }
    req.set("Connection", b"close".to_vec());
    if req.get("host").is_none() {
        req.set("Host", t.host.to_string().into_bytes());
    }
    let start = format!("{} {} HTTP/1.1", req.first, req.second);
    if let Err(e) = upstream.write_all(&req.encode(&start)) {
        return bad_gateway(client, &format!("sending to {}", t.host), e);
    }
    if expects && client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
        return;
    }
    // The body: exactly as framed, watched for placeholders.
    let mut scanner = BodyScanner::new(&proxy.secrets);
    let mut refused = None;
    let mut scan = |piece: &[u8]| -> io::Result<()> {
        for s in scanner.scan(&proxy.secrets, piece) {
            if let Err(r) = proxy.secret_check(t, s, "body") {
                refused = Some(r);
                return Err(io::Error::other("placeholder refused"));
            }
        }
        Ok(())
    };
    let mut src = BufReader::new(Prefixed::new(rest, &mut *client));
    let sent = body::copy(framing, &mut src, upstream, &mut scan).and_then(|_| upstream.flush());
    drop(src);
    if let Some(r) = refused {
        return r.send(client);
    }
    if let Err(e) = sent {
        return bad_gateway(client, "the request body", e);
    }
    respond(proxy, t, &req.first, client, upstream);
}

/// Relays the response (after any 1xx) with `Connection: close`.
fn respond<C: Write, U: Read>(
    proxy: &Proxy,
    t: &Target,
    method: &str,
    client: &mut C,
    upstream: &mut U,
) {
    let mut up = Prefixed::new(Vec::new(), upstream);
    let (resp, rest) = loop {
        let raw = match head::read(
            &mut up,
            |_, _| Ok(()),
            64 * 1024,
            proxy.limits.response_time,
        ) {
            Ok(r) => r,
            Err(HeadError::Io(e)) => {
                return bad_gateway(client, &format!("{} answered", t.host), e)
            }
            Err(e) => return bad_gateway(client, &format!("{} answered", t.host), e),
        };
        let resp = match Head::parse_response(&raw.bytes) {
            Ok(r) => r,
            Err(e) => return bad_gateway(client, &format!("{} answered", t.host), e),
        };
        up = Prefixed::new(raw.rest, up.inner);
        if resp.second.starts_with('1') && resp.second != "101" {
            if client.write_all(&raw.bytes).is_err() {
                return;
            }
            continue;
        }
        break (resp, up);
    };
    let framing = body::response(&resp, method);
    let mut resp = resp;
    for h in ["connection", "keep-alive", "proxy-connection"] {
        resp.remove(h);
    }
    resp.set("Connection", b"close".to_vec());
    let start = format!("{} {} {}", resp.first, resp.second, resp.third);
    if client.write_all(&resp.encode(&start)).is_err() {
        return;
    }
    let mut src = BufReader::with_capacity(64 * 1024, rest);
    let _ = body::copy(framing, &mut src, client, &mut |_| Ok(()));
    let _ = client.flush();
}
