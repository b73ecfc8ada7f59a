//! The vsock muxer driven by a script: guest packets (well-formed headers
//! with chosen fields, or raw chains), RX buffers, bytes poked anywhere,
//! host sockets that write, read and close, host-initiated connections,
//! and the loop's turns in any order. After every step the muxer must be
//! inside its bounds: connections, queued resets and RX work, and each
//! connection's buffered guest bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::script::Script;
#[cfg(test)]
use super::script::Writer;
use super::{guest_memory, raw_chain, Heap, MEM_LEN, RING_BASE};
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::{Turn, VsockHost, FIRST_LOCAL_PORT, HOST_CID};
use crate::vstate::memory::GuestMemory;

const GUEST_CID: u64 = 3;
/// The host port with an in-process listener, and one without.
const LISTENED: u32 = 1025;
const UNLISTENED: u32 = 1026;
/// Host sockets the script keeps (more are closed at once).
const MAX_HOST: usize = 64;

const PACKET: u8 = 0;
const RX_BUFFERS: u8 = 1;
const CHAIN: u8 = 2;
const POKE: u8 = 3;
const TURN: u8 = 4;
const HOST_IO: u8 = 5;
const CONNECT: u8 = 6;
const OPS: u8 = 8;

/// Plays one script: its first byte says whether the queues use EVENT_IDX.
pub fn vsock_muxer(data: &[u8]) {
    let mut s = Script::new(data);
    let event_idx = s.u8() & 1 == 1;
    let mem = guest_memory();
    let mut rx = Ring::at(RING_BASE);
    let mut tx = Ring::at(RING_BASE + 0x4000);
    let (mut rxq, mut txq) = (rx.queue(), tx.queue());
    rxq.set_event_idx(event_idx);
    txq.set_event_idx(event_idx);
    let host = VsockHost::new().expect("eventfd");
    let accepted = host.listen(LISTENED);
    let mut muxer = host
        .muxer(mem.clone(), rxq, txq, GUEST_CID)
        .expect("epoll and eventfds");
    let mut heap = Heap::new();
    let mut sockets: Vec<UnixStream> = Vec::new();

    while !s.ended() {
        match s.u8() % OPS {
            PACKET => {
                let descs = packet(&mut s, &mem, &mut heap);
                tx.post(&mem, &descs);
            }
            RX_BUFFERS => {
                let n = 1 + s.u8() % 8;
                let len = [4096, 44, 64, 65536][usize::from(s.u8() % 4)];
                for _ in 0..n {
                    let at = heap.alloc(u64::from(len));
                    rx.post(&mem, &[(at, len, WRITE)]);
                }
            }
            CHAIN => {
                let ring = if s.u8() & 1 == 0 { &mut rx } else { &mut tx };
                let descs = raw_chain(&mut s, 3);
                ring.post(&mem, &descs);
            }
            POKE => {
                let at = s.addr(MEM_LEN);
                let _ = mem.write_slice(s.blob(false), GuestAddress(at));
            }
            TURN => muxer.turn(match s.u8() % 5 {
                0 => Turn::Tx,
                1 => Turn::Rx,
                2 => Turn::Requests,
                3 => Turn::Sockets,
                _ => Turn::Expire,
            }),
            HOST_IO => host_io(&mut s, &accepted, &mut sockets),
            CONNECT => {
                let (ours, theirs) = UnixStream::pair().expect("socketpair");
                let port = match s.u8() % 3 {
                    0 => LISTENED,
                    1 => 5000,
                    _ => s.u32(),
                };
                host.attach(port, theirs, s.blob(false).to_vec());
                keep(&mut sockets, ours);
            }
            // 7: an available index set outright.
            _ => {
                let ring = if s.u8() & 1 == 0 { &mut rx } else { &mut tx };
                ring.set_avail_idx(&mem, s.u16());
            }
        }
        muxer.check_bounds();
    }
}

fn keep(sockets: &mut Vec<UnixStream>, s: UnixStream) {
    if sockets.len() < MAX_HOST && s.set_nonblocking(true).is_ok() {
        sockets.push(s);
    }
}

/// Takes connections the guest opened, then writes to, reads from or
/// closes one host socket.
fn host_io(s: &mut Script, accepted: &Receiver<UnixStream>, sockets: &mut Vec<UnixStream>) {
    while let Ok(stream) = accepted.try_recv() {
        keep(sockets, stream);
    }
    let what = s.u8();
    if sockets.is_empty() {
        return;
    }
    let i = usize::from(what >> 2) % sockets.len();
    match what % 4 {
        0 => {
            let _ = sockets[i].write(s.blob(true));
        }
        1 => {
            let mut buf = [0u8; 65536];
            while matches!(sockets[i].read(&mut buf), Ok(n) if n > 0) {}
        }
        2 => {
            let _ = sockets[i].shutdown(std::net::Shutdown::Write);
        }
        _ => {
            sockets.swap_remove(i);
        }
    }
}

/// A guest packet with fields the script picks, mostly plausible values.
fn packet(s: &mut Script, mem: &GuestMemory, heap: &mut Heap) -> Vec<(u64, u32, u16)> {
    let shape = s.u8();
    let src_cid = if shape & 1 == 0 { GUEST_CID } else { s.u64() };
    let dst_cid = if shape & 2 == 0 { HOST_CID } else { s.u64() };
    let type_ = if shape & 4 == 0 { TYPE_STREAM } else { s.u16() };
    let src_port = 1000 + u32::from(s.u8() % 4);
    let dst_port = match s.u8() % 5 {
        0 | 1 => LISTENED,
        2 => UNLISTENED,
        3 => FIRST_LOCAL_PORT + u32::from(s.u8() % 4),
        _ => s.u32(),
    };
    let op = u16::from(s.u8() % 8);
    let flags = u32::from(s.u8() % 4);
    let buf_alloc = if shape & 8 == 0 { 1 << 20 } else { s.u32() };
    let fwd_cnt = if shape & 16 == 0 { 0 } else { s.u32() };
    let payload = s.blob(true);
    let len = if shape & 32 == 0 {
        payload.len() as u32
    } else {
        s.u32()
    };
    let mut hdr = Vec::with_capacity(44);
    hdr.extend(src_cid.to_le_bytes());
    hdr.extend(dst_cid.to_le_bytes());
    hdr.extend(src_port.to_le_bytes());
    hdr.extend(dst_port.to_le_bytes());
    hdr.extend(len.to_le_bytes());
    hdr.extend(type_.to_le_bytes());
    hdr.extend(op.to_le_bytes());
    hdr.extend(flags.to_le_bytes());
    hdr.extend(buf_alloc.to_le_bytes());
    hdr.extend(fwd_cnt.to_le_bytes());
    if shape & 64 == 0 {
        // Header and data in separate buffers, as Linux sends them.
        let h = heap.put(mem, &hdr);
        let mut descs = vec![(h, 44, 0)];
        if !payload.is_empty() {
            descs.push((heap.put(mem, payload), payload.len() as u32, 0));
        }
        descs
    } else {
        let one = [hdr.as_slice(), payload].concat();
        vec![(heap.put(mem, &one), one.len() as u32, 0)]
    }
}

#[cfg(test)]
pub(super) fn seeds() -> Vec<Vec<u8>> {
    // shape 0: a well-formed packet from port 1000 + src to `dst` choice.
    let pkt = |w: &mut Writer, src: u8, dst: u8, op: u16, payload: &[u8]| {
        w.u8(PACKET).u8(0).u8(src).u8(dst);
        if dst == 3 {
            w.u8(0);
        }
        w.u8(op as u8).u8(0).blob(true, payload);
    };
    let turn = |w: &mut Writer, t: u8| {
        w.u8(TURN).u8(t);
    };
    let mut seeds = Vec::new();
    // A guest connection to the listened port: request, data both ways,
    // shutdown, and one to a port nobody serves.
    let mut w = Writer::default();
    w.u8(1).u8(RX_BUFFERS).u8(7).u8(0);
    pkt(&mut w, 0, 0, OP_REQUEST, b"");
    pkt(&mut w, 1, 2, OP_REQUEST, b"");
    turn(&mut w, 0);
    turn(&mut w, 1);
    pkt(&mut w, 0, 0, OP_RW, b"GET / HTTP/1.1\r\n\r\n");
    turn(&mut w, 0);
    w.u8(HOST_IO)
        .u8(0)
        .blob(true, b"HTTP/1.1 200 OK\r\n\r\nhello");
    w.u8(HOST_IO).u8(1);
    turn(&mut w, 3);
    turn(&mut w, 1);
    pkt(&mut w, 0, 0, OP_CREDIT_REQUEST, b"");
    pkt(&mut w, 0, 0, OP_SHUTDOWN, b"");
    turn(&mut w, 0);
    turn(&mut w, 1);
    seeds.push(w.0);
    // A host-initiated connection the guest accepts, then one it lets expire.
    let mut w = Writer::default();
    w.u8(0).u8(RX_BUFFERS).u8(3).u8(0);
    w.u8(CONNECT).u8(1).blob(false, b"prefix");
    turn(&mut w, 2);
    turn(&mut w, 1);
    w.u8(PACKET)
        .u8(0)
        .u8(0)
        .u8(3)
        .u8(0)
        .u8(OP_RESPONSE as u8)
        .u8(0)
        .blob(true, b"");
    turn(&mut w, 0);
    w.u8(CONNECT).u8(0).blob(false, b"");
    turn(&mut w, 2);
    turn(&mut w, 4);
    turn(&mut w, 1);
    seeds.push(w.0);
    // Connections opened and reset again and again while the guest posts
    // no RX buffers and a reset waits for one.
    let mut w = Writer::default();
    w.u8(0);
    pkt(&mut w, 0, 2, OP_REQUEST, b"");
    turn(&mut w, 0);
    for _ in 0..3000 {
        pkt(&mut w, 0, 0, OP_REQUEST, b"");
        pkt(&mut w, 0, 0, OP_RST, b"");
        turn(&mut w, 0);
        w.u8(HOST_IO).u8(1);
    }
    seeds.push(w.0);
    seeds
}
