//! Reading the server name a TLS client asks for, from its ClientHello,
//! before anything reaches the upstream.

use std::io::{self, Read};

/// Largest ClientHello we wait for (post-quantum key shares make them a
/// few KiB).
const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the connection does not start with a TLS ClientHello")]
    NotTls,
    #[error("the ClientHello is malformed")]
    Malformed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The ClientHello as read (to be replayed to whoever handles the TLS) and
/// the server name it carries, if any.
pub struct Hello {
    pub raw: Vec<u8>,
    pub sni: Option<String>,
}

fn read_exact_into<R: Read>(r: &mut R, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let start = buf.len();
    buf.resize(start + n, 0);
    r.read_exact(&mut buf[start..])
}

/// Reads TLS records from `r` until the whole ClientHello handshake message
/// is in; `raw` starts with `already` (bytes read with the CONNECT head).
pub fn read_hello<R: Read>(r: &mut R, already: Vec<u8>) -> Result<Hello, HelloError> {
    let mut raw = already;
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        if raw.len() < at + 5 {
            let need = at + 5 - raw.len();
            read_exact_into(r, &mut raw, need)?;
        }
        if raw[at] != 0x16 || raw[at + 1] != 3 {
            return Err(HelloError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([raw[at + 3], raw[at + 4]]));
        if raw.len() < at + 5 + len {
            let need = at + 5 + len - raw.len();
            read_exact_into(r, &mut raw, need)?;
        }
        handshake.extend_from_slice(&raw[at + 5..at + 5 + len]);
        at += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Err(HelloError::NotTls);
            }
            let body = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if handshake.len() >= 4 + body {
                let sni = server_name(&handshake[4..4 + body]).ok_or(HelloError::Malformed)?;
                return Ok(Hello { raw, sni });
            }
        }
        if raw.len() > MAX_HELLO {
            return Err(HelloError::Malformed);
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// The host_name entry of the server_name extension of a ClientHello body:
/// Some(None) when there is no such extension, None when malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor(body);
    c.take(2 + 32)?; // version, random
    let n = c.u8()?;
    c.take(n)?; // session id
    let n = c.u16()?;
    c.take(n)?; // cipher suites
    let n = c.u8()?;
    c.take(n)?; // compression methods
    if c.0.is_empty() {
        return Some(None);
    }
    let n = c.u16()?;
    let mut ext = Cursor(c.take(n)?);
    let mut name = None;
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let n = ext.u16()?;
        let data = ext.take(n)?;
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return None; // two server_name extensions
        }
        let mut d = Cursor(data);
        let n = d.u16()?;
        let mut list = Cursor(d.take(n)?);
        while !list.0.is_empty() {
            let t = list.u8()?;
            let n = list.u16()?;
            let v = list.take(n)?;
            if t == 0 {
                // HostName<1..2^16-1> (RFC 6066): an empty one is malformed.
                if name.is_some() || v.is_empty() {
                    return None;
                }
                name = Some(String::from_utf8(v.to_vec()).ok()?);
            }
        }
    }
    Some(name)
}

/// A fatal `access_denied` alert: the polite way to refuse a TLS client.
pub const ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `client_hello` fuzz target: a server_name extension
    /// whose host name is empty was read as the name "".
    #[test]
    fn an_empty_server_name_is_malformed() {
        let bytes: &[u8] = &[
            0x16, 0x03, 0x26, 0x00, 0x48, 0x01, 0x00, 0x00, 0x44, 0x03, 0x03, 0x00, 0x00, 0x01,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00, 0x00, 0x19, 0x00, 0x00, 0x00, 0x15,
            0x00, 0x12, 0xf8, 0x00, 0x00, 0x7e, 0x00, 0x05, 0x16, 0x00, 0x00, 0x44, 0x03, 0x03,
            0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x44, 0x03, 0x03, 0x00,
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x19, 0x00,
            0x74, 0x00, 0xfb, 0x15, 0x71, 0x65, 0x73, 0x13, 0x00, 0x00, 0x74, 0x69, 0xd2, 0x9a,
            0x87, 0x9e, 0x92, 0x8f, 0x93, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x9a, 0x2e, 0x74,
        ];
        let split = usize::from(5_u8).min(bytes.len());
        let r = read_hello(
            &mut std::io::Cursor::new(&bytes[split..]),
            bytes[..split].to_vec(),
        );
        assert!(
            matches!(r, Err(HelloError::Malformed)),
            "{:?}",
            r.map(|h| h.sni)
        );
    }
}
