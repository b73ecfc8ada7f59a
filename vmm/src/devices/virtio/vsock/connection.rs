//! One vsock stream between a guest port and a host Unix socket: its state
//! and both directions' credit accounting (virtio spec 5.10.6.3).
//!
//! Guest to host: the device advertises [`BUF_ALLOC`] bytes of buffer and
//! counts what it has written to the host socket in `fwd_cnt`. A guest that
//! sends more than that is breaking the protocol and is reset.
//! Host to guest: the device sends only while the guest's advertised buffer
//! has room, so a guest that never reads stalls only its own connection.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Bytes of guest data the device buffers per connection: the credit a
/// guest may send ahead of the host. 1 MiB lets the guest agent's output
/// (up to 1 MiB per write) go out as one run of packets, not a quarter
/// at a time waiting for credit; the muxer's budget bounds the total.
pub const BUF_ALLOC: u32 = 1024 * 1024;
/// Forwarded bytes after which the guest is told about the freed space.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked for the connection; waiting for the guest's RESPONSE
    /// (the muxer keeps the deadline).
    Connecting,
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    /// Write `OK <port>\n` to the host socket once established.
    pub announce: bool,
    /// Host bytes to deliver before reading the socket.
    pub prefix: VecDeque<u8>,
    /// Guest bytes the host socket has not taken yet.
    pub to_host: VecDeque<u8>,
    pub fwd_cnt: Wrapping<u32>,
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest, and the guest's advertised buffer.
    pub tx_cnt: Wrapping<u32>,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// epoll said the host socket is readable and it has not been drained since.
    pub host_readable: bool,
    /// The host socket reached EOF; the guest has been or will be told.
    pub host_eof: bool,
    pub guest_done_sending: bool,
    pub guest_done_receiving: bool,
    pub pending_request: bool,
    pub pending_response: bool,
    pub pending_credit: bool,
    /// In the muxer's ready list.
    pub queued: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            announce: false,
            prefix: VecDeque::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            pending_request: false,
            pending_response: false,
            pending_credit: false,
            queued: false,
        }
    }

    pub fn established(&self) -> bool {
        self.state == State::Established
    }

    /// Bytes the guest can take now. A guest claiming to have forwarded more
    /// than it was sent makes the count wrap past its buffer: it gets nothing.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Whether `len` more guest bytes fit the buffer the device advertised.
    pub fn accepts(&self, len: usize) -> bool {
        self.to_host.len() + len <= BUF_ALLOC as usize
    }

    pub fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending_credit = true;
        }
    }

    /// Every packet sent carries `fwd_cnt`, so it is also a credit update.
    pub fn credit_sent(&mut self) {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit = false;
    }

    /// Whether a host read could produce data for the guest right now.
    fn has_data(&self) -> bool {
        self.established()
            && !self.guest_done_receiving
            && self.peer_free() > 0
            && (!self.prefix.is_empty() || (self.host_readable && !self.host_eof))
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        self.pending_request || self.pending_response || self.pending_credit || self.has_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, 1, State::Established);
        c.update_peer_credit(1000, 0);
        c
    }

    #[test]
    fn peer_credit_bounds_what_is_sent() {
        let mut c = conn();
        assert_eq!(c.peer_free(), 1000);
        c.tx_cnt += Wrapping(600);
        assert_eq!(c.peer_free(), 400);
        c.update_peer_credit(1000, 600);
        assert_eq!(c.peer_free(), 1000);
        // A lying guest (forwarded more than it was sent) gets nothing.
        c.update_peer_credit(1000, 5000);
        assert_eq!(c.peer_free(), 0);
        c.update_peer_credit(1000, 100);
        c.tx_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_free(), 0);
        // Counters wrap.
        c.tx_cnt = Wrapping(5);
        c.update_peer_credit(100, u32::MAX - 4);
        assert_eq!(c.peer_free(), 90);
    }

    #[test]
    fn credit_updates_follow_forwarding() {
        let mut c = conn();
        assert!(c.accepts(BUF_ALLOC as usize));
        c.to_host.extend(std::iter::repeat_n(0u8, 10));
        assert!(!c.accepts(BUF_ALLOC as usize));
        c.forwarded(CREDIT_UPDATE_THRESHOLD as usize - 1);
        assert!(!c.pending_credit);
        c.forwarded(1);
        assert!(c.pending_credit && c.wants_rx());
        c.credit_sent();
        assert!(!c.pending_credit);
    }

    #[test]
    fn data_waits_for_credit_and_readiness() {
        let mut c = conn();
        assert!(!c.wants_rx());
        c.host_readable = true;
        assert!(c.wants_rx());
        c.update_peer_credit(0, 0);
        assert!(!c.wants_rx(), "no guest buffer, nothing to send");
        c.update_peer_credit(10, 0);
        c.guest_done_receiving = true;
        assert!(!c.wants_rx());
    }
}
