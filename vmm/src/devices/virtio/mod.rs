//! virtio 1.x devices over the MMIO transport. A device is configured by the
//! guest through [`mmio::MmioTransport`] registers and, once the driver says
//! it is ready, activated with its queues, which a worker thread of the
//! device's own then serves.

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_ring;

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
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

/// The driver set up as many queues (each with its kick) as the device has.
pub(crate) fn check_queues(
    queues: &[Queue],
    kicks: &[EventFd],
    want: usize,
) -> Result<(), ActivateError> {
    if queues.len() != want || kicks.len() != queues.len() {
        return Err(ActivateError::QueueCount {
            got: queues.len(),
            want,
        });
    }
    Ok(())
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

/// A device worker's loop over its queues: serves each queue once
/// (requests may have been queued before the driver said it was ready),
/// then each queue whose kick fires, until `stop` is readable. `device`
/// names it in the log line if the loop itself fails.
pub(crate) fn serve_kicks(
    device: &str,
    kicks: &[EventFd],
    stop: &EventFd,
    mut serve: impl FnMut(usize),
) {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    let epoll = Epoll::new().and_then(|epoll| {
        for (i, k) in kicks.iter().enumerate() {
            let ev = EpollEvent::new(EventSet::IN, i as u64);
            epoll.ctl(ControlOperation::Add, k.as_raw_fd(), ev)?;
        }
        let ev = EpollEvent::new(EventSet::IN, u64::MAX);
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), ev)?;
        Ok(epoll)
    });
    let epoll = match epoll {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "{device}: cannot wait for the driver; the device stops");
            return;
        }
    };
    for q in 0..kicks.len() {
        serve(q);
    }
    let mut events = vec![EpollEvent::default(); kicks.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "{device}: epoll failed; the device stops");
                return;
            }
        };
        for ev in &events[..n] {
            match usize::try_from(ev.data()).ok().filter(|q| *q < kicks.len()) {
                Some(q) => {
                    let _ = kicks[q].read();
                    serve(q);
                }
                None => {
                    let _ = stop.read();
                    return;
                }
            }
        }
    }
}

/// Answers every request the driver has queued in `queue`: `answer` gets
/// each descriptor chain and returns how many bytes it wrote into it;
/// each is returned to the driver, then the driver is interrupted once.
pub(crate) fn answer_all<'m>(
    device: &str,
    mem: &'m GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut answer: impl FnMut(virtio_queue::DescriptorChain<&'m GuestMemory>) -> u32,
) {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = answer(chain);
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!(error = %e, "{device}: cannot return a request");
        }
        used = true;
    }
    if used {
        interrupt.trigger(interrupt::INT_VRING);
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
