//! virtio 1.x devices over the MMIO transport. A device is configured by the
//! guest through [`mmio::MmioTransport`] registers and, once the driver says
//! it is ready, activated with its queues, which a worker thread of the
//! device's own then serves.

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod rng;
pub mod vsock;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_ring;

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;
pub use interrupt::Interrupt;

/// Feature bit every modern (virtio 1.x) device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver and device tell each other, through `used_event` and
/// `avail_event`, how far they have read, so each notifies only when the
/// other is waiting: fewer kicks (VM exits) and fewer interrupts (each one
/// two MMIO exits for the status read and acknowledgement). Every device
/// offers it; the transport sets it on the queues it activates.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// What the transport offers for every device, beside the device's own.
pub const TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

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

    /// Runs `run` on a thread named `name`, under `kind`'s seccomp filter;
    /// `stop` is what [`WorkerThread::stop`] signals.
    pub(crate) fn start(
        name: &str,
        kind: sbx_seccomp::Kind,
        stop: EventFd,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<WorkerThread, ActivateError> {
        let handle = sbx_seccomp::spawn(name, kind, run).map_err(ActivateError::Worker)?;
        Ok(WorkerThread { stop, handle })
    }

    /// Asks the thread to stop and waits for it.
    pub(crate) fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.handle.join();
    }
}

/// Starts the worker of a device whose queues are each served by
/// `serve` (block, rng): thread `thread` under `kind`'s filter, `device`
/// naming it in log lines.
pub(crate) fn start_queue_worker(
    thread: &str,
    device: &'static str,
    kind: sbx_seccomp::Kind,
    (mem, mut queues, kicks, interrupt): (GuestMemory, Vec<Queue>, Vec<EventFd>, Arc<Interrupt>),
    mut serve: impl FnMut(&GuestMemory, &mut Queue, &Interrupt) + Send + 'static,
) -> Result<WorkerThread, ActivateError> {
    let (stop, worker_stop) = WorkerThread::stop_fds()?;
    let run = move || {
        serve_kicks(device, &kicks, &worker_stop, |q| {
            serve(&mem, &mut queues[q], &interrupt)
        })
    };
    WorkerThread::start(thread, kind, stop, run)
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
/// each is returned to the driver, then the driver is interrupted once if
/// it asked to be ([`wants_interrupt`]).
///
/// With EVENT_IDX the driver kicks only when it passes `avail_event`, so
/// the queue is re-armed each time it looks empty and looked at once more
/// after that: a request added in between would otherwise wait for a kick
/// that never comes.
pub(crate) fn answer_all<'m>(
    device: &str,
    mem: &'m GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut answer: impl FnMut(virtio_queue::DescriptorChain<&'m GuestMemory>) -> u32,
) {
    let mut used = false;
    let mut rearmed = Rearmed::default();
    loop {
        let mut took = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = answer(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(error = %e, "{device}: cannot return a request");
            }
            took = true;
        }
        used |= took;
        if !rearmed.look_again(device, mem, queue, took) {
            break;
        }
    }
    if used && wants_interrupt(device, mem, queue) {
        interrupt.trigger(interrupt::INT_VRING);
    }
}

/// Re-arms a queue that looks empty, for a loop that drains it.
#[derive(Default)]
pub(crate) struct Rearmed(bool);

impl Rearmed {
    /// Asks the driver to kick for the next request and says whether one
    /// arrived meanwhile, so the caller takes it instead of waiting. `took`
    /// says whether the pass just ended took anything: a ring whose index
    /// still names requests right after a pass that found none is broken
    /// (a hostile driver's index past the queue's size), and is left until
    /// the next kick rather than spun on.
    pub(crate) fn look_again(
        &mut self,
        device: &str,
        mem: &GuestMemory,
        queue: &mut Queue,
        took: bool,
    ) -> bool {
        if self.0 && !took {
            tracing::debug!("{device}: the driver's available index names nothing to take");
            return false;
        }
        self.0 = true;
        queue.enable_notification(mem).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "{device}: cannot re-arm the queue's notifications");
            false
        })
    }
}

/// Whether the driver wants to hear of the chains returned to `queue`
/// since the last call (with EVENT_IDX it may say it does not need to yet).
/// Asked after every batch: the queue counts what it returned in between.
pub(crate) fn wants_interrupt(device: &str, mem: &GuestMemory, queue: &mut Queue) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        // An unreadable `used_event` is the driver's mistake; interrupting
        // anyway cannot hurt it.
        tracing::debug!(error = %e, "{device}: cannot read the driver's used_event");
        true
    })
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

#[cfg(test)]
mod tests {
    use super::test_ring::{Ring, WRITE};
    use super::*;

    fn interrupts(i: &Interrupt) -> u64 {
        i.irq().read().unwrap_or(0)
    }

    fn setup(event_idx: bool) -> (GuestMemory, Ring, Queue, Interrupt) {
        let mem = crate::vstate::memory::create(16).unwrap();
        let ring = Ring::at(0x10_000);
        let mut q = ring.queue();
        q.set_event_idx(event_idx);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (mem, ring, q, Interrupt::new(irq))
    }

    fn answer(mem: &GuestMemory, q: &mut Queue, i: &Interrupt) -> usize {
        let mut n = 0;
        answer_all("test", mem, q, i, |_| {
            n += 1;
            1
        });
        n
    }

    #[test]
    fn with_event_idx_the_driver_is_interrupted_only_when_it_asked() {
        let (mem, mut ring, mut q, irq) = setup(true);
        ring.post(&mem, &[(0x40_000, 64, WRITE)]);
        assert_eq!(answer(&mem, &mut q, &irq), 1);
        assert_eq!(
            interrupts(&irq),
            1,
            "used_event 0: the first return is heard"
        );
        assert_eq!(
            ring.avail_event(&mem),
            1,
            "the device asks for the next kick"
        );
        // The driver is still busy with what it has: no interrupt for these.
        ring.set_used_event(&mem, 10);
        for _ in 0..3 {
            ring.post(&mem, &[(0x40_000, 64, WRITE)]);
        }
        assert_eq!(answer(&mem, &mut q, &irq), 3);
        assert_eq!(interrupts(&irq), 0);
        assert_eq!(ring.avail_event(&mem), 4);
        assert_eq!(ring.take_used(&mem).len(), 4);
        // It waits for the used index to pass 4, which the next return does.
        ring.set_used_event(&mem, 4);
        ring.post(&mem, &[(0x40_000, 64, WRITE)]);
        assert_eq!(answer(&mem, &mut q, &irq), 1);
        assert_eq!(interrupts(&irq), 1);
    }

    #[test]
    fn without_event_idx_every_batch_interrupts() {
        let (mem, mut ring, mut q, irq) = setup(false);
        ring.set_used_event(&mem, 10);
        for _ in 0..2 {
            ring.post(&mem, &[(0x40_000, 64, WRITE)]);
            assert_eq!(answer(&mem, &mut q, &irq), 1);
            assert_eq!(interrupts(&irq), 1);
        }
        assert_eq!(
            ring.avail_event(&mem),
            0,
            "no avail_event without the feature"
        );
    }

    #[test]
    fn a_broken_available_index_is_not_spun_on() {
        let (mem, mut ring, mut q, irq) = setup(true);
        ring.post(&mem, &[(0x40_000, 64, WRITE)]);
        assert_eq!(answer(&mem, &mut q, &irq), 1);
        // An index 1,000 past what was taken names more than the queue holds.
        ring.set_avail_idx(&mem, 1001);
        assert_eq!(answer(&mem, &mut q, &irq), 0);
        assert_eq!(interrupts(&irq), 1);
    }
}
