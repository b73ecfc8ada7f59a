//! One request through the proxy where it can read HTTP: plain HTTP, and
//! HTTPS it intercepts. Request rules are checked, placeholders are swapped
//! for secrets only on the hosts their rules allow (and found anywhere else,
//! refused as exfiltration), and exactly one request and its response pass.

use std::io::{self, BufReader, Read, Write};

use crate::body;
use crate::gate::{Gate, Refusal, Target};
use crate::head::{self, Head, HeadError};
use crate::secrets::BodyScanner;
use crate::stream::Prefixed;

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

fn bad_gateway(client: &mut impl Write, what: &str, e: impl std::fmt::Display) {
    Refusal::new(502, format!("sbx egress proxy: {what}: {e}\n")).send(client);
}

/// Carries one request from `client` to `upstream` and its response back.
pub(crate) fn exchange<C: Read + Write, U: Read + Write>(
    gate: &Gate,
    t: &Target,
    mut req: Head,
    rest: Vec<u8>,
    client: &mut C,
    upstream: &mut U,
) {
    if let Err(r) = gate.check_request(t, &mut req) {
        return r.send(client);
    }
    let framing = match body::request(&req) {
        Ok(f) => f,
        Err(why) => {
            let what = format!("{}:{}", t.host, t.port);
            return gate.refuse_protocol(client, &what, 403, format!("a request with {why}"));
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
    let mut scanner = BodyScanner::new(&gate.secrets);
    let mut refused = None;
    let mut scan = |piece: &[u8]| -> io::Result<()> {
        for s in scanner.scan(&gate.secrets, piece) {
            if let Err(r) = gate.secret_check(t, s, "body") {
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
    respond(gate, t, &req.first, client, upstream);
}

/// Relays the response (after any 1xx) with `Connection: close`.
fn respond<C: Write, U: Read>(
    gate: &Gate,
    t: &Target,
    method: &str,
    client: &mut C,
    upstream: &mut U,
) {
    let mut up = Prefixed::new(Vec::new(), upstream);
    let (resp, rest) = loop {
        let raw = match head::read(&mut up, |_, _| Ok(()), 64 * 1024, gate.limits.response_time) {
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
