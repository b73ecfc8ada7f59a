//! The vsock device driven by a hostile guest: a small split-virtqueue
//! driver writes packets straight into guest memory, as a guest with root
//! (or a rogue driver) could, and checks what comes back. A real Linux
//! driver cannot be made to send malformed packets, so this is where
//! malformed input is exercised.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::BUF_ALLOC;
use super::packet::*;
use super::{Vsock, VsockConfig, VsockHost, HOST_CID};
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vstate::memory::{self, GuestMemory};

const GUEST_CID: u64 = 3;
#[derive(Clone, Copy, Debug, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn guest(src_port: u32, dst_port: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Hdr::default()
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(44);
        b.extend(self.src_cid.to_le_bytes());
        b.extend(self.dst_cid.to_le_bytes());
        b.extend(self.src_port.to_le_bytes());
        b.extend(self.dst_port.to_le_bytes());
        b.extend(self.len.to_le_bytes());
        b.extend(self.type_.to_le_bytes());
        b.extend(self.op.to_le_bytes());
        b.extend(self.flags.to_le_bytes());
        b.extend(self.buf_alloc.to_le_bytes());
        b.extend(self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Hdr {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A guest: memory, the device running on it, and the driver's rings.
struct Guest {
    mem: GuestMemory,
    tx: Ring,
    rx: Ring,
    kicks: Vec<EventFd>,
    irq: Arc<Interrupt>,
    host: VsockHost,
    _dev: Vsock,
    /// Next free byte for packet buffers.
    heap: u64,
    /// RX buffer addresses by descriptor head.
    rx_bufs: std::collections::HashMap<u32, u64>,
}

const RX_BUF: u32 = 4096;

impl Guest {
    fn new() -> Guest {
        let mem = memory::create(32).unwrap();
        let host = VsockHost::new().unwrap();
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: GUEST_CID as u32,
            uds_path: None,
            reserved_ports: vec![],
            host: host.clone(),
        })
        .unwrap();
        let rings = [0x10_000, 0x20_000, 0x30_000].map(Ring::at);
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            rings.iter().map(Ring::queue).collect(),
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            irq.clone(),
        )
        .unwrap();
        let [rx, tx, _] = rings;
        let mut g = Guest {
            mem,
            tx,
            rx,
            kicks,
            irq,
            host,
            _dev: dev,
            heap: 0x100_000,
            rx_bufs: Default::default(),
        };
        for _ in 0..64 {
            g.post_rx();
        }
        g
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.heap;
        self.heap += (len + 15) & !15;
        assert!(self.heap < 32 << 20, "test heap exhausted");
        at
    }

    fn post_rx(&mut self) {
        let (h, d) = (self.alloc(44), self.alloc(u64::from(RX_BUF)));
        let head = self.rx.next_desc;
        self.rx
            .post(&self.mem, &[(h, 44, WRITE), (d, RX_BUF, WRITE)]);
        self.rx_bufs.insert(u32::from(head), h);
        self.kicks[0].write(1).unwrap();
    }

    /// Sends a packet on the TX queue (header and optional data); the
    /// header's length is set from `data` unless the test set one.
    fn send(&mut self, mut hdr: Hdr, data: &[u8]) {
        if hdr.len == 0 {
            hdr.len = data.len() as u32;
        }
        let h = self.alloc(44);
        self.mem.write_slice(&hdr.bytes(), GuestAddress(h)).unwrap();
        if data.is_empty() {
            self.tx.post(&self.mem, &[(h, 44, 0)]);
        } else {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.tx
                .post(&self.mem, &[(h, 44, 0), (d, data.len() as u32, 0)]);
        }
    }

    /// Posts raw descriptors on the TX queue (for malformed chains).
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        self.tx.post(&self.mem, descs);
    }

    fn kick_tx(&self) {
        self.kicks[1].write(1).unwrap();
    }

    /// Packets the device delivered, with their data; recycles the buffers.
    fn receive(&mut self, wait: Duration) -> Vec<(Hdr, Vec<u8>)> {
        let deadline = std::time::Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            for (head, _len) in self.rx.take_used(&self.mem) {
                let h = self.rx_bufs.remove(&head).expect("a posted RX buffer");
                let mut hb = [0u8; 44];
                self.mem.read_slice(&mut hb, GuestAddress(h)).unwrap();
                let hdr = Hdr::parse(&hb);
                // The data buffer was allocated right after the header.
                let mut data = vec![0u8; hdr.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(h + 48))
                    .unwrap();
                out.push((hdr, data));
                self.post_rx();
            }
            if !out.is_empty() || std::time::Instant::now() >= deadline {
                return out;
            }
            let _ = self.irq.irq().read();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Collects packets until `pred` holds for one of them.
    fn receive_until(&mut self, mut pred: impl FnMut(&Hdr, &[u8]) -> bool) -> Vec<(Hdr, Vec<u8>)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut all = Vec::new();
        while std::time::Instant::now() < deadline {
            for (h, d) in self.receive(Duration::from_millis(100)) {
                let hit = pred(&h, &d);
                all.push((h, d));
                if hit {
                    return all;
                }
            }
        }
        panic!("the device never sent the packet waited for; got {all:?}");
    }
}

/// Connects guest port `port` to the host's in-process listener and
/// returns the host side.
fn connect(
    g: &mut Guest,
    port: u32,
    listener: &std::sync::mpsc::Receiver<std::os::unix::net::UnixStream>,
) -> std::os::unix::net::UnixStream {
    g.send(Hdr::guest(port, 1025, OP_REQUEST), &[]);
    g.kick_tx();
    g.receive_until(|h, _| h.op == OP_RESPONSE && h.dst_port == port);
    listener.recv_timeout(Duration::from_secs(5)).unwrap()
}

#[test]
fn a_flood_of_malformed_packets_resets_only_the_offenders() {
    let mut g = Guest::new();
    let listener = g.host.listen(1025);
    let mut good = connect(&mut g, 5000, &listener);

    for round in 0..20 {
        // Wrong source address, wrong destination, wrong socket type.
        let mut h = Hdr::guest(6000 + round, 1025, OP_REQUEST);
        h.src_cid = 99;
        g.send(h, &[]);
        let mut h = Hdr::guest(6000 + round, 1025, OP_REQUEST);
        h.dst_cid = 7;
        g.send(h, &[]);
        let mut h = Hdr::guest(6000 + round, 1025, OP_REQUEST);
        h.type_ = 2;
        g.send(h, &[]);
        // Data and unknown operations on connections that do not exist.
        g.send(Hdr::guest(7000 + round, 1025, OP_RW), b"nobody");
        g.send(Hdr::guest(7000 + round, 1025, 99), &[]);
        // A length the data descriptor does not have, and one over the limit.
        let mut h = Hdr::guest(5000, 1025, OP_RW);
        h.len = MAX_PKT_DATA + 1;
        g.send(h, &[]);
        // A header descriptor too short to hold a header, and a device-writable one.
        let a = g.alloc(64);
        g.send_raw(&[(a, 8, 0)]);
        g.send_raw(&[(a, 44, WRITE)]);
        // A descriptor pointing outside guest memory.
        g.send_raw(&[(1 << 40, 44, 0)]);
        g.kick_tx();
        // Meanwhile the good connection keeps working both ways.
        let msg = format!("round {round}");
        g.send(Hdr::guest(5000, 1025, OP_RW), msg.as_bytes());
        g.kick_tx();
        let mut buf = vec![0u8; msg.len()];
        good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        good.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
        good.write_all(b"pong").unwrap();
        let got = g.receive_until(|h, d| h.op == OP_RW && h.dst_port == 5000 && d == b"pong");
        // Offenders got resets; no packet went anywhere else.
        for (h, _) in &got {
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
            assert!(h.op == OP_RST || h.dst_port == 5000, "{h:?}");
        }
    }
}

#[test]
fn a_guest_that_overruns_its_credit_is_reset_alone() {
    let mut g = Guest::new();
    let listener = g.host.listen(1025);
    let _stalled = connect(&mut g, 5000, &listener);
    let mut other = connect(&mut g, 5001, &listener);
    // The host side of 5000 never reads: the device buffers up to
    // BUF_ALLOC bytes and then the guest must stop. This guest does not.
    let chunk = vec![7u8; MAX_PKT_DATA as usize];
    let sends = (BUF_ALLOC as usize + (2 << 20)) / chunk.len() + 2;
    for _ in 0..sends {
        g.send(Hdr::guest(5000, 1025, OP_RW), &chunk);
        if g.tx.avail_idx.is_multiple_of(64) {
            g.kick_tx();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    g.kick_tx();
    g.receive_until(|h, _| h.op == OP_RST && h.dst_port == 5000);
    // The other connection is untouched.
    g.send(Hdr::guest(5001, 1025, OP_RW), b"still here");
    g.kick_tx();
    let mut buf = [0u8; 10];
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut g = Guest::new();
    let listener = g.host.listen(1025);
    // This guest advertises 1000 bytes of buffer and never returns credit.
    let mut h = Hdr::guest(5000, 1025, OP_REQUEST);
    h.buf_alloc = 1000;
    g.send(h, &[]);
    g.kick_tx();
    g.receive_until(|h, _| h.op == OP_RESPONSE);
    let mut host = listener.recv_timeout(Duration::from_secs(5)).unwrap();
    host.write_all(&[1u8; 5000]).unwrap();
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        for (h, d) in g.receive(Duration::from_millis(50)) {
            if h.op == OP_RW {
                got += d.len();
            }
        }
    }
    assert_eq!(got, 1000, "the device sent more than the guest's buffer");
    // Returning credit lets the rest through.
    let mut h = Hdr::guest(5000, 1025, OP_CREDIT_UPDATE);
    h.buf_alloc = 1 << 20;
    h.fwd_cnt = 1000;
    g.send(h, &[]);
    g.kick_tx();
    let mut rest = 0;
    g.receive_until(|h, d| {
        rest += if h.op == OP_RW { d.len() } else { 0 };
        rest == 4000
    });
}

/// Many connections whose host side never reads, each filled to its
/// credit by a guest that keeps to it: the device holds at most its
/// budget for all of them together, and resets the connections past it
/// rather than growing. Played synchronously on the muxer, as the fuzz
/// target does, to push hundreds of MiB through quickly.
#[test]
fn stalled_connections_share_one_buffer_budget() {
    use super::muxer::MAX_BUFFERED;
    use super::Turn;

    let mem = memory::create(4).unwrap();
    let (mut rx, mut tx) = (Ring::at(0x10_000), Ring::at(0x20_000));
    let host = VsockHost::new().unwrap();
    let listener = host.listen(1025);
    let mut muxer = host
        .muxer(mem.clone(), rx.queue(), tx.queue(), GUEST_CID)
        .unwrap();
    let (h, d) = (0x100_000u64, 0x200_000u64);
    let chunk = 64 * 1024;
    mem.write_slice(&vec![7u8; chunk], GuestAddress(d)).unwrap();
    let mut send = |muxer: &mut super::muxer::Muxer, hdr: Hdr| {
        mem.write_slice(&hdr.bytes(), GuestAddress(h)).unwrap();
        let descs: &[(u64, u32, u16)] = if hdr.len == 0 {
            &[(h, 44, 0)]
        } else {
            &[(h, 44, 0), (d, hdr.len, 0)]
        };
        tx.post(&mem, descs);
        muxer.turn(Turn::Tx);
        muxer.check_bounds();
    };

    // Each holds a little under its credit: twice what fills the budget.
    let conns = 2 * MAX_BUFFERED / BUF_ALLOC as usize;
    let mut hosts = Vec::new();
    let (mut full, mut reset) = (0, 0);
    for i in 0..conns as u32 {
        let port = 5000 + i;
        send(&mut muxer, Hdr::guest(port, 1025, OP_REQUEST));
        hosts.push(
            listener
                .try_recv()
                .expect("the connection reached the host"),
        );
        // Within credit: what the host socket took comes back as credit.
        let mut sent = 0usize;
        loop {
            let (_, conn) = muxer.held((1025, port));
            let Some((_, fwd)) = conn else {
                reset += 1;
                break;
            };
            let credit = BUF_ALLOC as usize - (sent - fwd as usize);
            if credit < chunk {
                full += 1;
                break;
            }
            let mut hdr = Hdr::guest(port, 1025, OP_RW);
            hdr.len = chunk as u32;
            send(&mut muxer, hdr);
            sent += chunk;
        }
    }
    let (buffered, _) = muxer.held((0, 0));
    assert!(buffered <= MAX_BUFFERED, "{buffered} bytes held");
    assert!(
        buffered > MAX_BUFFERED - 2 * BUF_ALLOC as usize,
        "the budget was not used: {buffered} bytes held"
    );
    assert!(
        reset >= 1,
        "no connection was reset past the budget ({full} filled, {buffered} held)"
    );
    assert!(
        full >= MAX_BUFFERED / BUF_ALLOC as usize - 1,
        "{full} connections filled"
    );
    // The first connections are intact: their host side can still read.
    let mut first = &hosts[0];
    first.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    assert_eq!(first.read(&mut buf).unwrap(), 4096);
    let _ = &mut rx;
}
