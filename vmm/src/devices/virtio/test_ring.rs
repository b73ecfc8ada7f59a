//! A split virtqueue driven from the guest's side, as a hostile driver
//! would: tests post raw descriptor chains into guest memory and read the
//! used ring back.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;

pub const QSIZE: u16 = 256;
pub const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// One split virtqueue, driven from the guest's side.
pub struct Ring {
    pub base: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    /// Read by the tests' driver only; the fuzz driver never looks.
    #[cfg_attr(not(test), allow(dead_code))]
    pub used_seen: u16,
}

impl Ring {
    /// A ring whose descriptor table starts at guest address `base`.
    pub fn at(base: u64) -> Ring {
        Ring {
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    pub fn used(&self) -> u64 {
        (self.avail() + 4 + 2 * u64::from(QSIZE) + 2 + 3) & !3
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(self.base);
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.avail());
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.used());
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        q
    }

    /// Posts a chain of (addr, len, flags) descriptors.
    pub fn post(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let next = (idx + 1) % QSIZE;
            let flags = if i + 1 < descs.len() {
                flags | NEXT
            } else {
                flags
            };
            let at = GuestAddress(self.base + 16 * u64::from(idx));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
    }

    /// With EVENT_IDX: the used index after which the driver wants an
    /// interrupt.
    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        let at = self.avail() + 4 + 2 * u64::from(QSIZE);
        mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    /// With EVENT_IDX: the available index after which the device wants a kick.
    #[cfg(test)]
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.used() + 4 + 8 * u64::from(QSIZE);
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Sets the available index itself, as a hostile driver may.
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail() + 2)).unwrap();
    }

    /// Used entries (descriptor head, length) not seen yet.
    #[cfg(test)]
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used() + 4 + 8 * u64::from(self.used_seen % QSIZE);
            out.push((
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
