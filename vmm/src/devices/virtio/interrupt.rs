//! A virtio-mmio device's interrupt: a status register the guest reads and
//! acknowledges, and an irqfd that raises the device's GSI without a trip
//! through the vCPU thread.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The device used buffers in a queue.
pub const INT_VRING: u32 = 1;
/// The device's configuration changed (or it needs a reset).
pub const INT_CONFIG: u32 = 2;

pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    pub fn trigger(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        // An eventfd write fails only when the counter would overflow, in
        // which case an interrupt is pending anyway.
        if let Err(e) = self.irq.write(1) {
            tracing::debug!(error = %e, "irqfd write failed");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}
