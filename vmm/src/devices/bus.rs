//! Port I/O bus: routes a trapped `in`/`out` to the device owning that port range.
//! Ports nobody owns read as all ones and ignore writes, as on real hardware.

use std::sync::{Arc, Mutex};

pub trait PioDevice: Send {
    /// `offset` is relative to the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps a device already on the bus")]
pub struct OverlapError {
    pub base: u16,
    pub len: u16,
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), OverlapError> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        });
        if len == 0 || overlaps {
            return Err(OverlapError { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            // A poisoned lock means another vCPU thread panicked; the VM is going down anyway.
            Some((r, offset)) => match r.device.lock() {
                Ok(mut d) => d.read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((r, offset)) = self.find(port) {
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
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3ff, 2, dev.clone()).is_err());
        assert!(bus.insert(0x3f0, 8, dev.clone()).is_ok());
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b);
        assert_eq!(b[0], 2);
        bus.read(0x500, &mut b);
        assert_eq!(b[0], 0xff);
        bus.write(0x3f8, &[7]);
        assert_eq!(dev.lock().unwrap().0, vec![7]);
    }
}
