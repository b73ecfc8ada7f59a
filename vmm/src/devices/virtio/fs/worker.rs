//! The device's thread: waits for queue notifications and answers each
//! request chain through the FUSE server.

use std::io::ErrorKind;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::Guard;
use crate::devices::virtio::interrupt::{Interrupt, INT_VRING};
use crate::vstate::memory::GuestMemory;

pub struct Worker {
    mem: GuestMemory,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    stop: EventFd,
    server: Arc<Server<Arc<Guard>>>,
    epoll: Epoll,
}

impl Worker {
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        stop: EventFd,
        server: Arc<Server<Arc<Guard>>>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (i, k) in kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(k),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&stop),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        Ok(Self {
            mem,
            queues,
            kicks,
            interrupt,
            stop,
            server,
            epoll,
        })
    }

    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 4];
        // Requests may have been queued before the driver said it was ready.
        for q in 0..self.queues.len() {
            self.serve(q);
        }
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-fs: epoll failed; the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    u64::MAX => {
                        let _ = self.stop.read();
                        return;
                    }
                    q => {
                        let q = q as usize;
                        let _ = self.kicks[q].read();
                        self.serve(q);
                    }
                }
            }
        }
    }

    /// Answers every request in queue `q`, then interrupts once.
    fn serve(&mut self, q: usize) {
        let mem = &self.mem;
        let mut used = false;
        while let Some(chain) = self.queues[q].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match (
                Reader::from_descriptor_chain(mem, chain.clone()),
                VirtioFsWriter::new(mem, chain),
            ) {
                (Ok(r), Ok(w)) => match self.server.handle_message(r, w.into(), None, None) {
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
            if let Err(e) = self.queues[q].add_used(mem, head, len as u32) {
                tracing::warn!(error = %e, "virtio-fs: cannot return a request");
            }
            used = true;
        }
        if used {
            self.interrupt.trigger(INT_VRING);
        }
    }
}
