//! virtio 1.x devices over the MMIO transport. A device is configured by the
//! guest through [`mmio::MmioTransport`] registers and, once the driver says
//! it is ready, activated with its queues, which a worker thread of the
//! device's own then serves.

pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod vsock;

use std::sync::Arc;
use std::thread::JoinHandle;

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

/// Reads `data.len()` bytes of a device's configuration space `cfg` from
/// `offset`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| cfg.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// A device's worker thread and the eventfd that asks it to stop.
pub(crate) struct WorkerThread {
    stop: EventFd,
    handle: JoinHandle<()>,
}

impl WorkerThread {
    /// A fresh stop eventfd, twice: the first for [`WorkerThread::start`],
    /// the second for the worker's loop, which returns once it is readable.
    pub(crate) fn stop_fds() -> Result<(EventFd, EventFd), ActivateError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker = stop.try_clone().map_err(ActivateError::Worker)?;
        Ok((stop, worker))
    }

    /// Runs `run` on a thread named `name`; `stop` is what [`WorkerThread::stop`] signals.
    pub(crate) fn start(
        name: &str,
        stop: EventFd,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<WorkerThread, ActivateError> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(run)
            .map_err(ActivateError::Worker)?;
        Ok(WorkerThread { stop, handle })
    }

    /// Asks the thread to stop and waits for it.
    pub(crate) fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.handle.join();
    }
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
