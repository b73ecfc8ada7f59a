//! virtio-rng: the host's randomness for the guest kernel's pool. The
//! guest's hwrng driver fills its pool from it at boot, so the pool does
//! not depend on what a small VM can gather itself, and each VM's is its
//! own; a session restored from a snapshot will need exactly that.
//!
//! Each request is device-writable buffers the device fills from the
//! host's getrandom(2), up to [`MAX_PER_REQUEST`] bytes, so one request
//! costs the host a bounded amount of work.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{
    answer_all, check_queues, start_queue_worker, ActivateError, Interrupt, VirtioDevice,
    WorkerThread,
};
use crate::vstate::memory::GuestMemory;

pub const DEVICE_TYPE: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [64];
/// Bytes one request may take; Linux asks for at most a page at a time.
pub const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    worker: Option<WorkerThread>,
}

impl Rng {
    pub fn new() -> Rng {
        Rng::default()
    }
}

/// Fills the chain's device-writable buffers with random bytes; returns
/// how many it wrote. Driver-readable buffers are skipped.
fn fill(mem: &GuestMemory, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> u32 {
    let mut buf = [0u8; 4096];
    let mut written = 0usize;
    for d in chain.writable() {
        let mut at = d.addr();
        let mut left = (d.len() as usize).min(MAX_PER_REQUEST - written);
        while left > 0 {
            let n = left.min(buf.len());
            if getrandom(&mut buf[..n]).is_err() || mem.write_slice(&buf[..n], at).is_err() {
                return written as u32;
            }
            written += n;
            left -= n;
            at = GuestAddress(at.0.wrapping_add(n as u64));
        }
        if written >= MAX_PER_REQUEST {
            break;
        }
    }
    written as u32
}

/// getrandom(2), whole: the pool is initialised long before a VM starts.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Answers every request in `queue`, then interrupts once.
fn serve(mem: &GuestMemory, queue: &mut Queue, interrupt: &Interrupt) {
    answer_all("virtio-rng", mem, queue, interrupt, |chain| {
        fill(mem, chain)
    });
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        check_queues(&queues, &kicks, QUEUE_SIZES.len())?;
        self.worker = Some(start_queue_worker(
            "sbx-rng",
            "virtio-rng",
            sbx_seccomp::Kind::Rng,
            (mem, queues, kicks, interrupt),
            serve,
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.reset();
    }
}
