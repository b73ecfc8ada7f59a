//! What each guest packet does to its connection (virtio spec 5.10.6):
//! a REQUEST opens one to a host port, a RESPONSE completes one the host
//! asked for, RW carries data within the advertised credit, SHUTDOWN and
//! RST close. Anything out of place resets that connection only.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::{would_block, Key, Muxer, MAX_BUFFERED};
use crate::devices::virtio::vsock::connection::State;
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::HOST_CID;

impl Muxer {
    pub(super) fn guest_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let key = (pkt.dst_port(), pkt.src_port());
        let op = pkt.op();
        if pkt.src_cid() != self.s.guest_cid
            || pkt.dst_cid() != HOST_CID
            || pkt.type_() != TYPE_STREAM
        {
            self.note_malformed("wrong address or socket type");
            if op != OP_RST {
                self.queue_reset(key);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match op {
                OP_REQUEST => self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt()),
                OP_RST => {}
                _ => self.queue_reset(key),
            }
            return;
        };
        c.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        match (op, c.state) {
            (OP_RESPONSE, State::Connecting) => {
                c.state = State::Established;
                self.connecting.remove(&key);
                if c.announce && writeln!(&c.stream, "OK {}", key.0).is_err() {
                    self.kill(key);
                    return;
                }
            }
            (OP_RW, State::Established) => {
                if let Some(data) = pkt.data_slice() {
                    self.guest_data(key, data);
                }
            }
            (OP_SHUTDOWN, State::Established) => {
                let flags = pkt.flags();
                c.guest_done_sending |= flags & SHUTDOWN_SEND != 0;
                c.guest_done_receiving |= flags & SHUTDOWN_RCV != 0;
                if c.guest_done_sending && c.guest_done_receiving && c.to_host.is_empty() {
                    // The guest closed: it waits for our RST to finish.
                    self.kill(key);
                    return;
                }
                self.flush(key);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => c.pending_credit = true,
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            // Anything else (a second REQUEST, data before RESPONSE, unknown
            // operations) breaks the protocol: reset this connection only.
            _ => {
                self.note_malformed("operation out of place");
                self.kill(key);
                return;
            }
        }
        self.touch(key);
    }

    /// The guest connects to host port `key.0`.
    fn guest_connect(&mut self, key: Key, buf_alloc: u32, fwd_cnt: u32) {
        let port = key.0;
        let listener = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .listeners
            .get(&port)
            .cloned();
        let stream = if let Some(tx) = listener {
            UnixStream::pair()
                .ok()
                .and_then(|(ours, theirs)| tx.send(theirs).ok().map(|()| ours))
        } else if let Some(base) = &self.s.uds_path {
            let mut path = base.clone().into_os_string();
            path.push(format!("_{port}"));
            UnixStream::connect(&path).ok()
        } else {
            None
        };
        let Some(stream) = stream else {
            self.queue_reset(key);
            return;
        };
        match self.insert(key, stream, State::Established) {
            Some(c) => {
                c.update_peer_credit(buf_alloc, fwd_cnt);
                c.pending_response = true;
                self.touch(key);
            }
            None => self.queue_reset(key),
        }
    }

    fn guest_data<B: BitmapSlice>(&mut self, key: Key, data: &VolatileSlice<'_, B>) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let len = data.len();
        if !c.accepts(len) {
            self.note_malformed("data beyond the advertised credit");
            self.kill(key);
            return;
        }
        let mut written = 0;
        if c.to_host.is_empty() {
            // Straight from guest memory to the socket, without a copy.
            let guard = data.ptr_guard();
            // SAFETY: the slice is `len` bytes of mapped guest memory for the
            // guard's lifetime; write(2) only reads it.
            let r = unsafe { libc::write(c.stream.as_raw_fd(), guard.as_ptr().cast(), len) };
            if r >= 0 {
                written = r as usize;
            } else if !would_block(&std::io::Error::last_os_error()) {
                self.kill(key);
                return;
            }
        }
        if written < len {
            let rest_len = len - written;
            if self.buffered + rest_len > MAX_BUFFERED {
                tracing::warn!(
                    port = key.0,
                    "vsock: the guest holds {} MiB for host sockets that are not reading; \
                     this connection is reset",
                    MAX_BUFFERED >> 20
                );
                self.kill(key);
                return;
            }
            let mut rest = vec![0u8; rest_len];
            if let Ok(tail) = data.subslice(written, rest_len) {
                tail.copy_to(&mut rest[..]);
            }
            c.to_host.extend(rest);
            self.buffered += rest_len;
        }
        c.forwarded(written);
        self.touch(key);
    }
}
