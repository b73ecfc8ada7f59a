//! Firecracker's hybrid convention on a listening Unix socket: a host
//! client connects, sends `CONNECT <port>\n`, and once the guest accepts,
//! reads `OK <local port>\n`; after that the socket is the connection.
//! Ports reserved for sbx (the guest agent's) are refused.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::{add, would_block, Muxer, HANDSHAKE_TIMEOUT, MAX_CONNS};
use crate::devices::virtio::vsock::ConnectRequest;

/// A hybrid client that has not sent its `CONNECT <port>` line yet.
pub(super) struct Handshake {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
    pub(super) deadline: Instant,
}

impl Muxer {
    pub(super) fn accept_hybrid(&mut self) {
        let Some(listener) = self.s.listener.clone() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() + self.conns.len() >= MAX_CONNS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let token = self.token();
                    if add(&self.epoll, stream.as_raw_fd(), token, EventSet::IN).is_ok() {
                        self.handshakes.insert(
                            token,
                            Handshake {
                                stream,
                                line: Vec::new(),
                                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                            },
                        );
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept on the hybrid socket failed");
                    return;
                }
            }
        }
    }

    pub(super) fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        let h = self.handshakes.remove(&token)?;
        self.unwatch(&h.stream);
        Some(h)
    }

    /// Reads the client's `CONNECT <port>\n` one byte at a time, so that
    /// nothing after the line is consumed.
    pub(super) fn read_handshake(&mut self, token: u64) {
        let Some(h) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut b = [0u8; 1];
        loop {
            match (&h.stream).read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) if h.line.len() < 32 => h.line.push(b[0]),
                Err(e) if would_block(&e) => return,
                _ => {
                    self.drop_handshake(token);
                    return;
                }
            }
        }
        let Some(h) = self.drop_handshake(token) else {
            return;
        };
        let port = std::str::from_utf8(&h.line)
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        match port {
            Some(p) if !self.s.reserved.contains(&p) => {
                let _ = h.stream.set_nonblocking(false);
                self.connect(ConnectRequest {
                    port: p,
                    stream: h.stream,
                    prefix: Vec::new(),
                    announce: true,
                });
            }
            Some(p) => {
                tracing::info!(
                    port = p,
                    "vsock: hybrid client refused: port is reserved for sbx"
                );
            }
            None => tracing::debug!("vsock: malformed hybrid handshake"),
        }
    }
}
