//! Reading one HTTP message head (request or response) with limits on size
//! and time, so a huge or trickled head costs the proxy one bounded buffer
//! and one thread for a bounded time.

use std::io::{self, Read};
use std::time::{Duration, Instant};

/// Most header lines a head may have.
pub const MAX_HEADERS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the connection closed before a complete head")]
    Closed,
    #[error("the head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no complete head within {0:?}")]
    Timeout(Duration),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(io::Error),
}

impl HeadError {
    /// The status the proxy answers a client's head with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) => 431,
            HeadError::Timeout(_) => 408,
            _ => 400,
        }
    }
}

/// One head as read: its bytes, and any bytes read past its end.
pub struct RawHead {
    pub bytes: Vec<u8>,
    pub rest: Vec<u8>,
}

/// Reads until the blank line that ends a head. `read_timeout` must be
/// settable on the stream so the overall `deadline` holds.
pub fn read<R: Read>(
    r: &mut R,
    mut set_timeout: impl FnMut(&mut R, Duration) -> io::Result<()>,
    max: usize,
    within: Duration,
) -> Result<RawHead, HeadError> {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let left = within
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or(HeadError::Timeout(within))?;
        set_timeout(r, left).map_err(HeadError::Io)?;
        let n = match r.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout(within))
            }
            Err(e) => return Err(HeadError::Io(e)),
        };
        // Search only where the end can be: the new bytes and three before.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf[from..], b"\r\n\r\n").map(|i| from + i + 4) {
            if end > max {
                return Err(HeadError::TooLarge(max));
            }
            let rest = buf.split_off(end);
            return Ok(RawHead { bytes: buf, rest });
        }
        if buf.len() > max {
            return Err(HeadError::TooLarge(max));
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A parsed head: the start line's parts and the header fields in order.
#[derive(Clone, Debug)]
pub struct Head {
    /// Request: method; response: the protocol version.
    pub first: String,
    /// Request: target; response: status code.
    pub second: String,
    /// Request: version (1 for HTTP/1.1); response: reason phrase.
    pub third: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

fn malformed(e: impl std::fmt::Display) -> HeadError {
    HeadError::Malformed(e.to_string())
}

impl Head {
    pub fn parse_request(bytes: &[u8]) -> Result<Head, HeadError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(bytes).map_err(malformed)? {
            httparse::Status::Complete(_) => {}
            httparse::Status::Partial => return Err(malformed("incomplete request head")),
        }
        Ok(Head {
            first: req.method.unwrap_or_default().to_string(),
            second: req.path.unwrap_or_default().to_string(),
            third: req.version.unwrap_or(1).to_string(),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        })
    }

    pub fn parse_response(bytes: &[u8]) -> Result<Head, HeadError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut fields);
        match res.parse(bytes).map_err(malformed)? {
            httparse::Status::Complete(_) => {}
            httparse::Status::Partial => return Err(malformed("incomplete response head")),
        }
        Ok(Head {
            first: format!("HTTP/1.{}", res.version.unwrap_or(1)),
            second: res.code.unwrap_or(0).to_string(),
            third: res.reason.unwrap_or_default().to_string(),
            headers: res
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn set(&mut self, name: &str, value: Vec<u8>) {
        self.remove(name);
        self.headers.push((name.to_string(), value));
    }

    /// The head as bytes, with `start` as its first line.
    pub fn encode(&self, start: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(start.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (n, v) in &self.headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A minimal response from the proxy itself, closing the connection.
pub fn response(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nX-Sbx-Proxy: refused\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
