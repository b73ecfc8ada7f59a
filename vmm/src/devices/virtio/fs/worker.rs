//! The device's thread: waits for queue notifications and answers each
//! request chain through the FUSE server.

use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::Guard;
use crate::devices::virtio::interrupt::Interrupt;
use crate::devices::virtio::{answer_all, serve_kicks};
use crate::vstate::memory::GuestMemory;

pub struct Worker {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    server: Arc<Server<Arc<Guard>>>,
}

impl Worker {
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        server: Arc<Server<Arc<Guard>>>,
    ) -> Self {
        Self {
            mem,
            queues,
            interrupt,
            server,
        }
    }

    /// Serves the queues until `stop` is readable.
    pub fn run(mut self, kicks: Vec<EventFd>, stop: EventFd) {
        serve_kicks("virtio-fs", &kicks, &stop, |q| self.serve(q));
    }

    /// Answers every request in queue `q`, then interrupts once.
    fn serve(&mut self, q: usize) {
        let (mem, server) = (&self.mem, &self.server);
        answer_all(
            "virtio-fs",
            mem,
            &mut self.queues[q],
            &self.interrupt,
            |chain| answer(server, mem, chain),
        );
    }
}

/// Answers one request chain through the FUSE server; returns the bytes
/// written into the chain.
pub(crate) fn answer(
    server: &Server<Arc<Guard>>,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> u32 {
    let len = match (
        Reader::from_descriptor_chain(mem, chain.clone()),
        VirtioFsWriter::new(mem, chain),
    ) {
        (Ok(r), Ok(w)) => match server.handle_message(r, w.into(), None, None) {
            Ok(n) => n,
            Err(e) => {
                // The server answers file system errors itself; this is
                // a request it could not even decode.
                tracing::debug!(error = %e, "virtio-fs: bad request");
                0
            }
        },
        _ => {
            tracing::debug!("virtio-fs: a descriptor chain outside guest memory");
            0
        }
    };
    len as u32
}
