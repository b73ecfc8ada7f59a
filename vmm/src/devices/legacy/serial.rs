//! COM1: an 8250 UART whose output goes to the console sink and whose input
//! comes from the host (interactive use).

use std::io::Write;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_IRQ: u32 = 4;

pub struct SerialConsole {
    uart: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    /// Nothing is taken until the guest driver enables the receive interrupt:
    /// the 8250 driver flushes the FIFO when a tty opens, so earlier input
    /// would be lost.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        const IER_RECEIVED_DATA: u8 = 0x01;
        if self.uart.state().interrupt_enable & IER_RECEIVED_DATA == 0 {
            return 0;
        }
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // A failing console sink must not stop the guest; output is lost, not the VM.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}
