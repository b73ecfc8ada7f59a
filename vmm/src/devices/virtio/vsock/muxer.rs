//! The vsock device's worker thread: moves packets between the guest's
//! queues and host Unix sockets, one epoll loop for everything.
//!
//! The guest is hostile. Every packet is checked (addresses, type, state,
//! credit) and anything wrong resets that one connection; undecodable
//! descriptor chains are returned unused. Work per wakeup is bounded by the
//! queue sizes, and replies to unknown connections by a fixed queue, so a
//! flooding guest costs CPU but cannot grow memory or stall other
//! connections.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Conn, State, BUF_ALLOC};
use super::packet::*;
use super::{ConnectRequest, Shared, HOST_CID};
use crate::devices::virtio::interrupt::{Interrupt, INT_VRING};
use crate::vstate::memory::GuestMemory;

/// Connections one VM may hold open at once.
const MAX_CONNS: usize = 1024;
/// Resets for unknown connections waiting for an RX buffer.
const MAX_PENDING_RESETS: usize = 1024;
/// How long the guest has to accept a host-initiated connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hybrid client has to send its `CONNECT <port>` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Host ports handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_WAKE: u64 = 4;
const TOKEN_LISTENER: u64 = 5;
const FIRST_TOKEN: u64 = 16;

/// (host port, guest port)
type Key = (u32, u32);

pub struct Setup {
    pub mem: GuestMemory,
    pub rx: Queue,
    pub tx: Queue,
    pub kicks: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub stop: EventFd,
    pub guest_cid: u64,
    pub uds_path: Option<PathBuf>,
    pub listener: Option<Arc<UnixListener>>,
    pub reserved: Vec<u32>,
}

/// A hybrid client that has not sent its `CONNECT <port>` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Outgoing {
    Reset(Key),
    Conn(Key),
}

pub struct Muxer {
    s: Setup,
    shared: Arc<Shared>,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    /// Host-initiated connections still waiting for the guest's RESPONSE,
    /// with the time they give up: only these are checked for expiry.
    connecting: HashMap<Key, Instant>,
    next_token: u64,
    next_port: u32,
    /// Connections that may have a packet for the guest, served round-robin.
    ready: VecDeque<Key>,
    resets: VecDeque<Key>,
    used: bool,
    malformed: u64,
}

fn add(epoll: &Epoll, fd: i32, token: u64, events: EventSet) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Muxer {
    pub fn new(s: Setup, shared: Arc<Shared>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let tokens = [TOKEN_RX, TOKEN_TX, TOKEN_EVENT];
        for (kick, token) in s.kicks.iter().zip(tokens) {
            add(&epoll, kick.as_raw_fd(), token, EventSet::IN)?;
        }
        add(&epoll, s.stop.as_raw_fd(), TOKEN_STOP, EventSet::IN)?;
        add(&epoll, shared.wake.as_raw_fd(), TOKEN_WAKE, EventSet::IN)?;
        if let Some(l) = &s.listener {
            add(&epoll, l.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)?;
        }
        Ok(Self {
            s,
            shared,
            epoll,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            connecting: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_port: FIRST_LOCAL_PORT,
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            used: false,
            malformed: 0,
        })
    }

    pub fn run(mut self) {
        // Requests queued before the guest's driver came up.
        self.take_requests();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            self.process_rx();
            if std::mem::take(&mut self.used) {
                self.s.interrupt.trigger(INT_VRING);
            }
            let timeout = if self.has_deadlines() { 250 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: epoll failed; the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                match token {
                    TOKEN_RX | TOKEN_EVENT => {
                        let _ = self.s.kicks[token as usize].read();
                    }
                    TOKEN_TX => {
                        let _ = self.s.kicks[1].read();
                        self.process_tx();
                    }
                    TOKEN_STOP => return,
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                        self.take_requests();
                    }
                    TOKEN_LISTENER => self.accept_hybrid(),
                    t if self.handshakes.contains_key(&t) => self.read_handshake(t),
                    t => self.socket_event(t, set),
                }
            }
            self.expire(Instant::now());
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn has_deadlines(&self) -> bool {
        !self.handshakes.is_empty() || !self.connecting.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.drop_handshake(t);
        }
        let late: Vec<Key> = self
            .connecting
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            tracing::debug!(port = key.1, "vsock: guest did not accept in time");
            self.kill(key);
        }
    }

    // ---- connections -------------------------------------------------

    fn insert(&mut self, key: Key, stream: UnixStream, state: State) -> Option<&mut Conn> {
        if self.conns.len() >= MAX_CONNS || self.conns.contains_key(&key) {
            return None;
        }
        if stream.set_nonblocking(true).is_err() {
            return None;
        }
        let token = self.token();
        // Edge-triggered: a readable socket stays marked until a read would
        // block, and a hung-up socket is reported once rather than forever.
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if add(&self.epoll, stream.as_raw_fd(), token, events).is_err() {
            return None;
        }
        self.by_token.insert(token, key);
        self.conns.insert(key, Conn::new(stream, token, state));
        self.touch(key);
        self.conns.get_mut(&key)
    }

    /// Queues `key` for the RX loop if it has a packet for the guest.
    fn touch(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.wants_rx() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn unwatch(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn remove(&mut self, key: Key) -> Option<Conn> {
        let c = self.conns.remove(&key)?;
        self.by_token.remove(&c.token);
        self.connecting.remove(&key);
        self.unwatch(&c.stream);
        Some(c)
    }

    /// Ends a connection and tells the guest.
    fn kill(&mut self, key: Key) {
        if self.remove(key).is_some() {
            self.queue_reset(key);
        }
    }

    fn queue_reset(&mut self, key: Key) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(key);
        }
    }

    fn local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Starts a host-initiated connection to `req.port` in the guest.
    fn connect(&mut self, req: ConnectRequest) {
        let local = self.local_port(req.port);
        let key = (local, req.port);
        match self.insert(key, req.stream, State::Connecting) {
            Some(c) => {
                c.announce = req.announce;
                c.prefix.extend(req.prefix);
                c.pending_request = true;
                self.connecting
                    .insert(key, Instant::now() + CONNECT_TIMEOUT);
                self.touch(key);
            }
            None => tracing::warn!(port = req.port, "vsock: too many connections"),
        }
    }

    fn take_requests(&mut self) {
        let connects = {
            let mut r = self
                .shared
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut r.connects)
        };
        for req in connects {
            self.connect(req);
        }
    }

    // ---- hybrid Unix socket -----------------------------------------

    fn accept_hybrid(&mut self) {
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

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        let h = self.handshakes.remove(&token)?;
        self.unwatch(&h.stream);
        Some(h)
    }

    /// Reads the client's `CONNECT <port>\n` one byte at a time, so that
    /// nothing after the line is consumed.
    fn read_handshake(&mut self, token: u64) {
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

    // ---- host socket events -------------------------------------------

    fn socket_event(&mut self, token: u64, set: EventSet) {
        let Some(&key) = self.by_token.get(&token) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            if let Some(c) = self.conns.get_mut(&key) {
                c.host_readable = true;
            }
        }
        if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            self.flush(key);
        }
        self.touch(key);
    }

    /// Writes buffered guest bytes to the host socket.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (front, _) = c.to_host.as_slices();
            match (&c.stream).write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.forwarded(n);
                }
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    self.kill(key);
                    return;
                }
            }
        }
        if c.to_host.is_empty() && c.guest_done_sending {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.host_eof || c.guest_done_receiving {
                self.kill(key);
                return;
            }
        }
        self.touch(key);
    }

    // ---- guest to host (TX queue) -------------------------------------

    fn process_tx(&mut self) {
        let mem = self.s.mem.clone();
        while let Some(mut chain) = self.s.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.guest_packet(&pkt),
                Err(e) => self.note_malformed(&e.to_string()),
            }
            if let Err(e) = self.s.tx.add_used(&mem, head, 0) {
                tracing::warn!(error = %e, "vsock: cannot return a TX buffer");
            }
            self.used = true;
        }
    }

    fn note_malformed(&mut self, what: &str) {
        self.malformed += 1;
        // The first few are worth a line; a flood is not.
        if self.malformed <= 5 || self.malformed.is_power_of_two() {
            tracing::warn!(
                count = self.malformed,
                "vsock: malformed packet from the guest: {what}"
            );
        }
    }

    fn guest_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
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
            let mut rest = vec![0u8; len - written];
            if let Ok(tail) = data.subslice(written, len - written) {
                tail.copy_to(&mut rest[..]);
            }
            c.to_host.extend(rest);
        }
        c.forwarded(written);
        self.touch(key);
    }

    // ---- host to guest (RX queue) -------------------------------------

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

    fn process_rx(&mut self) {
        let mem = self.s.mem.clone();
        while let Some(out) = self.next_outgoing() {
            let Some(mut chain) = self.s.rx.pop_descriptor_chain(&mem) else {
                // No buffers: wait for the guest to post some (an RX kick).
                return;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, u32::MAX) {
                Ok(p) => p,
                Err(e) => {
                    self.note_malformed(&e.to_string());
                    let _ = self.s.rx.add_used(&mem, head, 0);
                    self.used = true;
                    continue;
                }
            };
            if pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]).is_err() {
                let _ = self.s.rx.add_used(&mem, head, 0);
                self.used = true;
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
                    self.used = true;
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
