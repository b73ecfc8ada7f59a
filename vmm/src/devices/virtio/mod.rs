//! virtio 1.x devices over the MMIO transport. A device is configured by the
//! guest through [`mmio::MmioTransport`] registers and, once the driver says
//! it is ready, activated with its queues, which a worker thread of the
//! device's own then serves.

pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;
pub use interrupt::Interrupt;

/// Feature bit every modern (virtio 1.x) device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not ready or does not fit guest memory")]
    BadQueue(usize),
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    /// The virtio device id (19 for vsock, 26 for fs).
    fn device_type(&self) -> u32;
    /// The largest size the driver may give each queue, one entry per queue.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    /// Reads device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver has finished setting up: start serving `queues`.
    /// `kicks[i]` becomes readable when the driver notifies queue `i`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops serving the queues (driver reset or VM teardown).
    fn reset(&mut self);
}
