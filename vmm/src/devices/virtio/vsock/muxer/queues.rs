//! The guest's queues: TX (guest to host) is drained packet by packet
//! into [`Muxer::guest_packet`]; RX (host to guest) is filled with resets
//! first, then round-robin from the connections that have something to
//! send, within the guest's credit.

use std::num::Wrapping;
use std::os::fd::AsRawFd;

use virtio_queue::QueueOwnedT;
use virtio_queue::QueueT;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::Bytes;

use super::{would_block, Key, Muxer, Outgoing, DEVICE};
use crate::devices::virtio::vsock::connection::{Conn, BUF_ALLOC};
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::HOST_CID;
use crate::devices::virtio::Rearmed;

impl Muxer {
    pub(super) fn process_tx(&mut self) {
        let mem = self.s.mem.clone();
        let mut rearmed = Rearmed::default();
        loop {
            let mut took = false;
            while let Some(mut chain) = self.s.tx.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => self.guest_packet(&pkt),
                    Err(e) => self.note_malformed(&e.to_string()),
                }
                if let Err(e) = self.s.tx.add_used(&mem, head, 0) {
                    tracing::warn!(error = %e, "vsock: cannot return a TX buffer");
                }
                took = true;
            }
            self.used_tx |= took;
            if !rearmed.look_again(DEVICE, &mem, &mut self.s.tx, took) {
                return;
            }
        }
    }

    fn next_outgoing(&mut self) -> Option<Outgoing> {
        if let Some(&key) = self.resets.front() {
            return Some(Outgoing::Reset(key));
        }
        while let Some(&key) = self.ready.front() {
            match self.conns.get(&key) {
                Some(c) if c.wants_rx() => return Some(Outgoing::Conn(key)),
                Some(_) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.queued = false;
                    }
                }
                None => {}
            }
            self.ready.pop_front();
        }
        None
    }

    pub(super) fn process_rx(&mut self) {
        let mem = self.s.mem.clone();
        let mut rearmed = Rearmed::default();
        let mut took = false;
        while let Some(out) = self.next_outgoing() {
            let Some(mut chain) = self.s.rx.pop_descriptor_chain(&mem) else {
                // No buffers: wait for the guest to post some (an RX kick),
                // unless it posted some while the kick was being asked for.
                if rearmed.look_again(DEVICE, &mem, &mut self.s.rx, took) {
                    took = false;
                    continue;
                }
                return;
            };
            took = true;
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, u32::MAX) {
                Ok(p) => p,
                Err(e) => {
                    self.note_malformed(&e.to_string());
                    let _ = self.s.rx.add_used(&mem, head, 0);
                    self.used_rx = true;
                    continue;
                }
            };
            if pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]).is_err() {
                let _ = self.s.rx.add_used(&mem, head, 0);
                self.used_rx = true;
                continue;
            }
            pkt.set_src_cid(HOST_CID)
                .set_dst_cid(self.s.guest_cid)
                .set_type(TYPE_STREAM)
                .set_buf_alloc(BUF_ALLOC);
            let len = match out {
                Outgoing::Reset(key) => {
                    self.resets.pop_front();
                    pkt.set_src_port(key.0).set_dst_port(key.1).set_op(OP_RST);
                    Some(0)
                }
                Outgoing::Conn(key) => {
                    self.ready.pop_front();
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.queued = false;
                    }
                    pkt.set_src_port(key.0).set_dst_port(key.1);
                    let len = self.fill(key, &mut pkt);
                    self.touch(key);
                    len
                }
            };
            match len {
                Some(n) => {
                    let total = PKT_HEADER_SIZE as u32 + n;
                    if let Err(e) = self.s.rx.add_used(&mem, head, total) {
                        tracing::warn!(error = %e, "vsock: cannot return an RX buffer");
                    }
                    self.used_rx = true;
                }
                // Nothing to send after all: give the buffer back for later.
                None => self.s.rx.go_to_previous_position(),
            }
        }
    }

    /// Writes the connection's next packet into `pkt` and returns its data
    /// length, or None when there turned out to be nothing to send.
    fn fill<B: BitmapSlice>(&mut self, key: Key, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        let c = self.conns.get_mut(&key)?;
        let mut len = 0u32;
        let op = if c.pending_request {
            c.pending_request = false;
            OP_REQUEST
        } else if c.pending_response {
            c.pending_response = false;
            OP_RESPONSE
        } else {
            match Self::read_host(c, pkt) {
                HostRead::Data(n) => {
                    len = n;
                    c.tx_cnt += Wrapping(n);
                    OP_RW
                }
                HostRead::Eof => {
                    // Tell the guest nothing more will come; it may still send.
                    c.host_eof = true;
                    pkt.set_flags(SHUTDOWN_SEND);
                    OP_SHUTDOWN
                }
                HostRead::Failed => {
                    self.kill(key);
                    return None;
                }
                HostRead::Nothing if c.pending_credit => OP_CREDIT_UPDATE,
                HostRead::Nothing => return None,
            }
        };
        pkt.set_op(op).set_len(len).set_fwd_cnt(c.fwd_cnt.0);
        c.credit_sent();
        Some(len)
    }

    /// Moves prefix or host socket bytes into the packet's buffer.
    fn read_host<B: BitmapSlice>(c: &mut Conn, pkt: &mut VsockPacket<'_, B>) -> HostRead {
        if !c.established() || c.guest_done_receiving || c.host_eof {
            return HostRead::Nothing;
        }
        let Some(data) = pkt.data_slice() else {
            return HostRead::Nothing;
        };
        let cap = data.len().min(c.peer_free() as usize);
        if cap == 0 {
            return HostRead::Nothing;
        }
        if !c.prefix.is_empty() {
            let n = cap.min(c.prefix.len());
            let bytes: Vec<u8> = c.prefix.drain(..n).collect();
            return match data.write_slice(&bytes, 0) {
                Ok(()) => HostRead::Data(n as u32),
                Err(_) => HostRead::Failed,
            };
        }
        if !c.host_readable {
            return HostRead::Nothing;
        }
        let guard = data.ptr_guard_mut();
        // SAFETY: the slice is at least `cap` writable bytes of mapped guest
        // memory for the guard's lifetime.
        let r = unsafe { libc::read(c.stream.as_raw_fd(), guard.as_ptr().cast(), cap) };
        match r {
            0 => {
                c.host_readable = false;
                HostRead::Eof
            }
            n if n > 0 => HostRead::Data(n as u32),
            _ if would_block(&std::io::Error::last_os_error()) => {
                c.host_readable = false;
                HostRead::Nothing
            }
            _ => HostRead::Failed,
        }
    }
}

enum HostRead {
    Data(u32),
    Eof,
    /// Nothing to read now (no credit, no buffer, or the socket would block).
    Nothing,
    Failed,
}
