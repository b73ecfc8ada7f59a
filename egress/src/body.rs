//! Message bodies of the one request and one response an intercepted
//! connection carries: framed exactly as HTTP/1.1 says, so nothing after
//! the request (a smuggled second request) ever reaches the upstream.

use std::io::{self, BufRead, Write};

use crate::head::Head;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A response that ends when the upstream closes.
    UntilClose,
}

/// How a request's body is framed, refusing the ambiguous cases that
/// request smuggling relies on.
pub fn request(head: &Head) -> Result<Framing, String> {
    let te = head.get("transfer-encoding");
    let cl = head.get("content-length");
    match (te, cl) {
        (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length".into()),
        (Some(te), None) => {
            if head.count("transfer-encoding") == 1 && te.eq_ignore_ascii_case(b"chunked") {
                Ok(Framing::Chunked)
            } else {
                Err("a Transfer-Encoding other than chunked".into())
            }
        }
        (None, Some(_)) => length(head).map(Framing::Length),
        (None, None) => Ok(Framing::None),
    }
}

fn length(head: &Head) -> Result<u64, String> {
    let mut value = None;
    for (n, v) in &head.headers {
        if n.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("a Content-Length that is not a number")?;
            if value.is_some_and(|v| v != n) {
                return Err("two different Content-Lengths".into());
            }
            value = Some(n);
        }
    }
    value.ok_or_else(|| "no Content-Length".into())
}

/// How a response to `method` is framed.
pub fn response(head: &Head, method: &str) -> Framing {
    let code: u16 = head.second.parse().unwrap_or(0);
    if method.eq_ignore_ascii_case("HEAD") || code < 200 || code == 204 || code == 304 {
        return Framing::None;
    }
    match head.get("transfer-encoding") {
        Some(te) if te.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
        Some(_) => Framing::UntilClose,
        None => length(head).map_or(Framing::UntilClose, Framing::Length),
    }
}

/// Copies one body from `src` to `dst`, handing every piece to `scan`
/// before it is written; `scan` stops the copy by returning an error.
pub fn copy<R: BufRead, W: Write>(
    framing: Framing,
    src: &mut R,
    dst: &mut W,
    scan: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut total = 0;
    let pass = |src: &mut R,
                dst: &mut W,
                scan: &mut dyn FnMut(&[u8]) -> io::Result<()>,
                mut n: u64|
     -> io::Result<u64> {
        let mut moved = 0;
        while n > 0 || n == u64::MAX {
            let buf = src.fill_buf()?;
            if buf.is_empty() {
                if n == u64::MAX {
                    return Ok(moved);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the body ended early",
                ));
            }
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            scan(&buf[..take])?;
            dst.write_all(&buf[..take])?;
            src.consume(take);
            moved += take as u64;
            if n != u64::MAX {
                n -= take as u64;
            }
        }
        Ok(moved)
    };
    match framing {
        Framing::None => {}
        Framing::Length(n) => total += pass(src, dst, scan, n)?,
        Framing::UntilClose => total += pass(src, dst, scan, u64::MAX)?,
        Framing::Chunked => loop {
            let line = read_line(src)?;
            let size_text = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size_text)
                .ok()
                .map(str::trim)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            scan(&line)?;
            dst.write_all(&line)?;
            dst.write_all(b"\r\n")?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let t = read_line(src)?;
                    scan(&t)?;
                    dst.write_all(&t)?;
                    dst.write_all(b"\r\n")?;
                    if t.is_empty() {
                        return Ok(total);
                    }
                }
            }
            total += pass(src, dst, scan, size)?;
            if !read_line(src)?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a chunk is longer than its size",
                ));
            }
            dst.write_all(b"\r\n")?;
        },
    }
    dst.flush()?;
    Ok(total)
}

/// One CRLF-terminated line without its CRLF, at most 8 KiB.
fn read_line<R: BufRead>(src: &mut R) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let buf = src.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended early",
            ));
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                src.consume(i + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            None => {
                line.extend_from_slice(buf);
                let n = buf.len();
                src.consume(n);
            }
        }
        if line.len() > 8192 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a chunk line is too long",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            first: "POST".into(),
            second: "/".into(),
            third: "1".into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        assert!(request(&head(&[
            ("Content-Length", "3"),
            ("Transfer-Encoding", "chunked")
        ]))
        .is_err());
        assert!(request(&head(&[("Content-Length", "3"), ("content-length", "4")])).is_err());
        assert!(request(&head(&[("Content-Length", "+3")])).is_err());
        assert!(request(&head(&[("Transfer-Encoding", "gzip, chunked")])).is_err());
        assert_eq!(
            request(&head(&[("Content-Length", "3"), ("content-length", "3")])),
            Ok(Framing::Length(3))
        );
        assert_eq!(request(&head(&[])), Ok(Framing::None));
    }

    #[test]
    fn chunked_bodies_stop_at_their_end() {
        let input =
            b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nT: 1\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        let mut src = std::io::BufReader::new(&input[..]);
        let mut out = Vec::new();
        let n = copy(Framing::Chunked, &mut src, &mut out, &mut |_| Ok(())).unwrap();
        assert_eq!(n, 9);
        assert_eq!(out, b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nT: 1\r\n\r\n");
        let mut bad = std::io::BufReader::new(&b"2\r\nabc\r\n0\r\n\r\n"[..]);
        assert!(copy(Framing::Chunked, &mut bad, &mut Vec::new(), &mut |_| Ok(())).is_err());
    }
}
