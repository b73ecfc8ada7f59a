//! Address buses: route a trapped port or MMIO access to the device owning
//! that range. Addresses nobody owns read as all ones and ignore writes, as
//! on real hardware. The same structure serves port I/O (16-bit addresses)
//! and MMIO (64-bit).

use std::sync::{Arc, Mutex};

pub trait BusDevice: Send {
    /// `offset` is relative to the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("address range {base:#x}+{len:#x} overlaps a device already on the bus")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

/// The guest's two address spaces: port I/O (legacy devices) and MMIO (virtio).
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), OverlapError> {
        let err = OverlapError { base, len };
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        let overlaps = self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end);
        if len == 0 || overlaps {
            return Err(err);
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            // A poisoned lock means another thread panicked; the VM is going down anyway.
            Some((r, offset)) => match r.device.lock() {
                Ok(mut d) => d.read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((r, offset)) = self.find(addr) {
            if let Ok(mut d) = r.device.lock() {
                d.write(offset, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3ff, 2, dev.clone()).is_err());
        assert!(bus.insert(0x3f0, 8, dev.clone()).is_ok());
        assert!(bus.insert(u64::MAX - 1, 4, dev.clone()).is_err());
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b);
        assert_eq!(b[0], 2);
        bus.read(0x500, &mut b);
        assert_eq!(b[0], 0xff);
        bus.write(0x3f8, &[7]);
        assert_eq!(dev.lock().unwrap().0, vec![7]);
    }
}
