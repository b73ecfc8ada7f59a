//! The virtio-mmio transport, the split virtqueue and the block device's
//! requests, driven by a script: register reads and writes (a standard
//! driver handshake among them), descriptor chains posted raw or as
//! well-formed block requests, bytes poked anywhere in guest memory, and
//! the queue served. The disk is a real file; a read-only one must come
//! out unchanged and none may change size.

use std::sync::{Arc, Mutex, OnceLock};

use virtio_bindings::virtio_blk::*;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::script::Script;
#[cfg(test)]
use super::script::Writer;
use super::{guest_memory, raw_chain, Heap, ProcessDir, MEM_LEN, RING_BASE};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_ring::{Ring, QSIZE, WRITE};
use crate::devices::virtio::{
    ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vstate::memory::GuestMemory;

const SECTORS: u64 = 64;
const DISK_LEN: usize = SECTORS as usize * 512;

/// What the transport handed the device when the driver said DRIVER_OK.
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The block device with its worker thread replaced by the script: it
/// keeps the queue the transport activates it with, and the script says
/// when it is served.
struct Synchronous {
    block: Block,
    active: Arc<Mutex<Option<Active>>>,
}

impl VirtioDevice for Synchronous {
    fn device_type(&self) -> u32 {
        self.block.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.block.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.block.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.block.read_config(offset, data)
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        _kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [queue]: [Queue; 1] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 1,
                })?;
        *self.active.lock().unwrap() = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        *self.active.lock().unwrap() = None;
    }
}

/// The disk's first contents: sector n starts with n.
fn disk_image() -> Vec<u8> {
    let mut image = vec![0u8; DISK_LEN];
    for n in 0..SECTORS as usize {
        image[n * 512] = n as u8;
    }
    image
}

const MMIO_WRITE: u8 = 0;
const MMIO_READ: u8 = 1;
const HANDSHAKE: u8 = 2;
const CHAIN: u8 = 3;
const REQUEST: u8 = 4;
const POKE: u8 = 5;
const SERVE: u8 = 6;
const AVAIL_IDX: u8 = 7;
const OPS: u8 = 8;

/// The request types a script picks from (the last is raw).
const TYPES: [u32; 5] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
];

/// Plays one script: its first byte says whether the disk is read-only.
pub fn virtio_queue(data: &[u8]) {
    static DIR: OnceLock<ProcessDir> = OnceLock::new();
    let path = DIR
        .get_or_init(|| ProcessDir::new("blk"))
        .0
        .join("disk.img");
    let image = disk_image();
    std::fs::write(&path, &image).expect("cannot write the fuzzed disk");

    let mut s = Script::new(data);
    let read_only = s.u8() & 1 == 1;
    let block = Block::new(&BlockConfig {
        path: path.clone(),
        read_only,
        serial: "fuzz".into(),
    })
    .expect("cannot open the fuzzed disk");
    let serve = block.server();
    let mem = guest_memory();
    let active = Arc::new(Mutex::new(None));
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut transport = MmioTransport::new(
        Box::new(Synchronous {
            block,
            active: active.clone(),
        }),
        mem.clone(),
        Arc::new(Interrupt::new(irq)),
        vec![kick],
    );
    let mut ring = Ring::at(RING_BASE);
    let mut heap = Heap::new();

    while !s.ended() {
        match s.u8() % OPS {
            MMIO_WRITE => {
                let (offset, value) = (u64::from(s.u16() % 0x200), s.u32());
                transport.write(offset, &value.to_le_bytes());
            }
            MMIO_READ => {
                let mut b = [0u8; 4];
                transport.read(u64::from(s.u16() % 0x200), &mut b);
            }
            HANDSHAKE => handshake(&mut transport, &ring, s.u8()),
            CHAIN => {
                let descs = raw_chain(&mut s, 4);
                ring.post(&mem, &descs);
            }
            REQUEST => {
                let descs = request(&mut s, &mem, &mut heap);
                ring.post(&mem, &descs);
            }
            POKE => {
                let at = s.addr(MEM_LEN);
                let _ = mem.write_slice(s.blob(false), GuestAddress(at));
            }
            SERVE => {
                if let Some(a) = active.lock().unwrap().as_mut() {
                    serve(&a.mem, &mut a.queue, &a.interrupt);
                }
            }
            AVAIL_IDX.. => match s.u8() & 1 {
                0 => ring.set_avail_idx(&mem, s.u16()),
                _ => ring.set_used_event(&mem, s.u16()),
            },
        }
    }
    drop(transport);

    let after = std::fs::read(&path).expect("cannot read the fuzzed disk back");
    assert_eq!(after.len(), DISK_LEN, "the guest changed the disk's size");
    if read_only {
        assert!(after == image, "the guest wrote to a read-only disk");
    }
}

/// A driver's setup of queue 0 at [`RING_BASE`], as Linux does it;
/// `choice` picks whether it takes EVENT_IDX.
fn handshake(t: &mut MmioTransport, ring: &Ring, choice: u8) {
    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(0x70, 0);
    w(0x70, 1);
    w(0x70, 1 | 2);
    let mut features = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH);
    if choice & 1 == 1 {
        features |= VIRTIO_RING_F_EVENT_IDX;
    }
    if choice & 2 == 2 {
        features |= 1 << VIRTIO_BLK_F_DISCARD;
    }
    w(0x24, 0);
    w(0x20, features as u32);
    w(0x24, 1);
    w(0x20, (features >> 32) as u32);
    w(0x70, 1 | 2 | 8);
    w(0x30, 0);
    w(0x38, u32::from(QSIZE));
    let split = |a: u64| (a as u32, (a >> 32) as u32);
    for (reg, addr) in [(0x80, ring.base), (0x90, ring.avail()), (0xa0, ring.used())] {
        let (lo, hi) = split(addr);
        w(reg, lo);
        w(reg + 4, hi);
    }
    w(0x44, 1);
    w(0x70, 1 | 2 | 8 | 4);
}

/// A block request as a driver frames it: header, data buffers, status.
fn request(s: &mut Script, mem: &GuestMemory, heap: &mut Heap) -> Vec<(u64, u32, u16)> {
    let pick = s.u8();
    let type_ = match TYPES.get(usize::from(pick % 6)) {
        Some(t) => *t,
        None => s.u32(),
    };
    let raw = s.u64();
    // Mostly sectors near the disk's end; sometimes anything.
    let sector = if raw >> 63 == 0 {
        raw % (SECTORS + 8)
    } else {
        raw
    };
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&type_.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut descs = vec![(heap.put(mem, &header), 16, 0)];
    let device_writes = matches!(type_, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let flags = if device_writes { WRITE } else { 0 };
    for _ in 0..s.u8() % 3 {
        let len = u32::from(s.u16());
        let at = heap.alloc(u64::from(len));
        if type_ == VIRTIO_BLK_T_DISCARD {
            // One segment: sector, sectors, flags.
            let seg = [s.u64().to_le_bytes(), u64::from(s.u32()).to_le_bytes()].concat();
            let _ = mem.write_slice(&seg, GuestAddress(at));
        } else {
            let fill = s.blob(false);
            let _ = mem.write_slice(fill, GuestAddress(at));
        }
        descs.push((at, len, flags));
    }
    descs.push((heap.alloc(1), 1, WRITE));
    descs
}

#[cfg(test)]
pub(super) fn seeds() -> Vec<Vec<u8>> {
    let request = |w: &mut Writer, pick: u8, sector: u64, len: u16| {
        w.u8(REQUEST)
            .u8(pick)
            .u64(sector)
            .u8(1)
            .u16(len)
            .blob(false, b"data");
    };
    let mut seeds = Vec::new();
    for read_only in [0u8, 1] {
        let mut w = Writer::default();
        w.u8(read_only).u8(HANDSHAKE).u8(1);
        request(&mut w, 0, 3, 512);
        request(&mut w, 1, 5, 1024);
        request(&mut w, 1, SECTORS - 1, 1024);
        w.u8(REQUEST).u8(2).u64(0).u8(0);
        w.u8(REQUEST).u8(3).u64(0).u8(1).u16(20).blob(false, b"");
        w.u8(SERVE);
        seeds.push(w.0);
    }
    let mut w = Writer::default();
    w.u8(0).u8(HANDSHAKE).u8(3);
    w.u8(REQUEST)
        .u8(4)
        .u64(0)
        .u8(1)
        .u16(16)
        .u64(4)
        .u32(8)
        .u8(SERVE);
    w.u8(CHAIN)
        .u8(1)
        .addr(0x2_0000)
        .u32(16)
        .u8(0)
        .addr(0x2_1000)
        .u32(1)
        .u8(2);
    w.u8(AVAIL_IDX)
        .u8(1)
        .u16(0)
        .u8(AVAIL_IDX)
        .u8(0)
        .u16(1000)
        .u8(SERVE);
    w.u8(MMIO_WRITE).u16(0x70).u32(0).u8(MMIO_READ).u16(0x100);
    w.u8(POKE)
        .addr(RING_BASE)
        .blob(false, &[0xff; 32])
        .u8(SERVE);
    seeds.push(w.0);
    seeds
}
