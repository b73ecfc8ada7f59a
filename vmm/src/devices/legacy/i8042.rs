//! The i8042 keyboard controller, kept only for its CPU reset line: a guest
//! booted with `reboot=k` writes 0xfe to port 0x64 to reboot, which ends the VM.

use crate::devices::bus::BusDevice;

pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

pub struct ResetLine<T: vm_superio::Trigger> {
    dev: vm_superio::I8042Device<T>,
}

impl<T: vm_superio::Trigger> ResetLine<T> {
    pub fn new(on_reset: T) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(on_reset),
        }
    }
}

impl<T: vm_superio::Trigger + Send> BusDevice for ResetLine<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.dev.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}
