//! The vsock device's worker thread: moves packets between the guest's
//! queues and host Unix sockets, one epoll loop for everything. This file
//! routes (the loop, the connection table, host socket events); the
//! queues' work is in [`queues`], each guest packet's effect on its
//! connection in [`csm`], and the hybrid socket's handshake in [`hybrid`].
//!
//! The guest is hostile. Every packet is checked (addresses, type, state,
//! credit) and anything wrong resets that one connection; undecodable
//! descriptor chains are returned unused. Work per wakeup is bounded by the
//! queue sizes, and replies to unknown connections by a fixed queue, so a
//! flooding guest costs CPU but cannot grow memory or stall other
//! connections.

mod csm;
mod hybrid;
mod queues;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Conn, State};
use super::{ConnectRequest, Shared};
use crate::devices::virtio::interrupt::{Interrupt, INT_VRING};
use crate::devices::virtio::wants_interrupt;
use crate::vstate::memory::GuestMemory;
use hybrid::Handshake;

/// Connections one VM may hold open at once.
const MAX_CONNS: usize = 1024;
/// Guest bytes the device holds for host sockets that have not taken
/// them, across all connections. Each connection may hold its credit
/// (`BUF_ALLOC`); this bounds what a guest gets by holding many full ones
/// (1,024 of them would be 256 MiB). Past it, the connection whose data
/// does not fit is reset.
pub(crate) const MAX_BUFFERED: usize = 64 << 20;
/// Entries in the RX round-robin (live connections, and ones closed
/// since they were queued, which are dropped when reached).
const MAX_READY: usize = 2 * MAX_CONNS;
/// Resets for unknown connections waiting for an RX buffer.
const MAX_PENDING_RESETS: usize = 1024;
/// How long the guest has to accept a host-initiated connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hybrid client has to send its `CONNECT <port>` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Host ports handed out to host-initiated connections.
pub(crate) const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_WAKE: u64 = 4;
const TOKEN_LISTENER: u64 = 5;
const FIRST_TOKEN: u64 = 16;
/// How the device names itself in log lines.
const DEVICE: &str = "vsock";

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
    /// Buffers were returned to the queue since the driver last heard.
    used_rx: bool,
    used_tx: bool,
    malformed: u64,
    /// The sum of every connection's `to_host`.
    buffered: usize,
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
            used_rx: false,
            used_tx: false,
            malformed: 0,
            buffered: 0,
        })
    }

    pub fn run(mut self) {
        // Requests queued before the guest's driver came up.
        self.take_requests();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            self.process_rx();
            self.interrupt();
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

    /// One interrupt for both queues, if the driver wants to hear of
    /// either's returned buffers (each queue is asked, so each forgets
    /// what it counted).
    fn interrupt(&mut self) {
        let mem = &self.s.mem;
        let rx = std::mem::take(&mut self.used_rx) && wants_interrupt(DEVICE, mem, &mut self.s.rx);
        let tx = std::mem::take(&mut self.used_tx) && wants_interrupt(DEVICE, mem, &mut self.s.tx);
        if rx || tx {
            self.s.interrupt.trigger(INT_VRING);
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
                if self.ready.len() >= MAX_READY {
                    self.prune_ready();
                }
                self.ready.push_back(key);
            }
        }
    }

    /// Drops the entries of closed connections from the RX round-robin.
    /// They are otherwise dropped only when RX reaches them, which a guest
    /// that posts no RX buffers while it opens and resets connections
    /// never lets happen. Once per `MAX_READY` entries: O(1) amortized.
    fn prune_ready(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let conns = &self.conns;
        self.ready
            .retain(|k| conns.get(k).is_some_and(|c| c.queued) && seen.insert(*k));
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
        self.buffered -= c.to_host.len();
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
                    self.buffered -= n;
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
}

/// One turn of the loop, chosen by the fuzz driver in place of epoll.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) enum Turn {
    /// The guest kicked TX.
    Tx,
    /// The loop's head: fill RX, then interrupt.
    Rx,
    /// The host queued connection requests.
    Requests,
    /// Every host socket is readable and writable.
    Sockets,
    /// Every deadline has passed.
    Expire,
}

#[cfg(any(test, feature = "fuzzing"))]
impl Muxer {
    pub(crate) fn turn(&mut self, turn: Turn) {
        match turn {
            Turn::Tx => self.process_tx(),
            Turn::Rx => {
                self.process_rx();
                self.interrupt();
            }
            Turn::Requests => self.take_requests(),
            Turn::Sockets => {
                let tokens: Vec<u64> = self.by_token.keys().copied().collect();
                for t in tokens {
                    self.socket_event(t, EventSet::IN | EventSet::OUT);
                }
            }
            Turn::Expire => self.expire(Instant::now() + CONNECT_TIMEOUT.max(HANDSHAKE_TIMEOUT)),
        }
    }

    /// Guest bytes held for host sockets, in all and for `key` (with the
    /// bytes forwarded on it), for tests that play a well-behaved guest.
    #[cfg(test)]
    pub(crate) fn held(&self, key: Key) -> (usize, Option<(usize, u32)>) {
        let conn = self.conns.get(&key).map(|c| (c.to_host.len(), c.fwd_cnt.0));
        (self.buffered, conn)
    }

    /// What a guest may never push the muxer past.
    pub(crate) fn check_bounds(&self) {
        assert!(self.conns.len() <= MAX_CONNS, "too many connections");
        assert_eq!(self.by_token.len(), self.conns.len(), "stale tokens");
        assert!(self.resets.len() <= MAX_PENDING_RESETS, "too many resets");
        assert!(
            self.ready.len() <= MAX_READY,
            "{} connections queued for RX with {} open",
            self.ready.len(),
            self.conns.len()
        );
        let sum: usize = self.conns.values().map(|c| c.to_host.len()).sum();
        assert_eq!(sum, self.buffered, "buffered bytes miscounted");
        assert!(self.buffered <= MAX_BUFFERED, "past the VM's buffer budget");
        for c in self.conns.values() {
            assert!(
                c.to_host.len() <= super::connection::BUF_ALLOC as usize,
                "past the credit"
            );
        }
    }
}
