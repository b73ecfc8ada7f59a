//! `sbx-mcp-bridge`: the gateway as a stdio MCP server, for agents that
//! only start stdio servers. Each JSON-RPC message read from standard input
//! is POSTed to the gateway's Streamable HTTP endpoint; every message of
//! the answer (one JSON body, or the events of an SSE stream) is written to
//! standard output as one line. Requests run side by side, so a slow tool
//! does not hold up the others.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use sbx_protocol::mcp::GUEST_PORT;

/// What the gateway gave this bridge's session.
#[derive(Default)]
struct Session {
    id: Option<String>,
    version: Option<String>,
}

pub fn main() -> i32 {
    let session = Arc::new(Mutex::new(Session::default()));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut pending = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let is_init = line.contains("\"initialize\"");
        let (session, out) = (session.clone(), out.clone());
        let run = move || {
            if let Err(e) = post(&line, &session, &out) {
                eprintln!("sbx-mcp-bridge: {e}");
                answer_error(&line, &e, &out);
            }
        };
        // The handshake finishes before anything else is sent, so every
        // later request carries the session it made.
        if is_init {
            run();
        } else {
            pending.push(std::thread::spawn(run));
        }
        pending.retain(|t| !t.is_finished());
    }
    for t in pending {
        let _ = t.join();
    }
    0
}

/// A JSON-RPC error for a request the gateway could not be asked.
fn answer_error(line: &str, why: &str, out: &Mutex<std::io::Stdout>) {
    let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    let Some(id) = msg.get("id") else { return };
    let reply = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": -32603, "message": format!("sbx-mcp-bridge: {why}") },
    });
    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(o, "{reply}");
    let _ = o.flush();
}

fn post(body: &str, session: &Mutex<Session>, out: &Mutex<std::io::Stdout>) -> Result<(), String> {
    let mut conn = TcpStream::connect(("127.0.0.1", GUEST_PORT))
        .map_err(|e| format!("cannot reach the gateway: {e}"))?;
    let mut head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{GUEST_PORT}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    {
        let s = session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = &s.id {
            head.push_str(&format!("Mcp-Session-Id: {id}\r\n"));
        }
        if let Some(v) = &s.version {
            head.push_str(&format!("MCP-Protocol-Version: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())
        .and_then(|()| conn.write_all(body.as_bytes()))
        .map_err(|e| format!("cannot send to the gateway: {e}"))?;

    let mut r = BufReader::new(conn);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the gateway answered {status:?}"))?;
    let (mut length, mut chunked, mut sse) = (None, false, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_err(|e| e.to_string())? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => length = v.parse::<u64>().ok(),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "content-type" => sse = v.starts_with("text/event-stream"),
            "mcp-session-id" => {
                session.lock().unwrap_or_else(|e| e.into_inner()).id = Some(v.to_string())
            }
            _ => {}
        }
    }
    let body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        }))
    } else if let Some(n) = length {
        Box::new(BufReader::new(r.take(n)))
    } else {
        Box::new(r)
    };
    let emit = |msg: &str| {
        remember_version(msg, session);
        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{msg}");
        let _ = o.flush();
    };
    if sse {
        // Events: `data:` lines, joined, up to a blank line.
        let mut data = String::new();
        for line in body.lines() {
            let line = line.map_err(|e| e.to_string())?;
            if line.is_empty() {
                if !data.trim().is_empty() {
                    emit(data.trim());
                }
                data.clear();
            } else if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if !data.trim().is_empty() {
            emit(data.trim());
        }
    } else {
        let mut text = String::new();
        let mut body = body;
        body.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let text = text.trim();
        if text.starts_with('{') || text.starts_with('[') {
            // One line per message, as stdio wants.
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => emit(&v.to_string()),
                Err(_) => return Err(format!("the gateway sent unreadable JSON ({code})")),
            }
        } else if !(200..300).contains(&code) {
            return Err(format!("the gateway answered {code}: {text}"));
        }
    }
    Ok(())
}

/// The protocol version the gateway agreed to, from its `initialize` answer.
fn remember_version(msg: &str, session: &Mutex<Session>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(msg) else {
        return;
    };
    if let Some(p) = v["result"]["protocolVersion"].as_str() {
        session.lock().unwrap_or_else(|e| e.into_inner()).version = Some(p.to_string());
    }
}

/// A chunked HTTP/1.1 body, de-chunked.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.inner.read_line(&mut size)? == 0 {
                self.done = true;
                return Ok(0);
            }
            let hex = size.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(hex, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
            return Ok(0);
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        let wire = b"5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n";
        let mut c = Chunked {
            inner: &wire[..],
            left: 0,
            done: false,
        };
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello, world");
    }
}
