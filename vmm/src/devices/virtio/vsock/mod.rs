//! virtio-vsock, served in user space (no vhost): the guest's only channel
//! to the host. Host-side endpoints are Unix stream sockets: sbx's own
//! services get one end of a socketpair in-process ([`VsockHost`]), and
//! other tools use Firecracker's hybrid convention on a listening Unix socket
//! (connect, send `CONNECT <port>\n`, read `OK <local port>\n`; guest
//! connections to port P go to `<uds>_P`).

mod connection;
mod muxer;
pub(crate) mod packet;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, ActivateError, Interrupt, VirtioDevice, WorkerThread};
use crate::vstate::memory::GuestMemory;

pub const DEVICE_TYPE: u32 = 19;
/// The host's address, as every guest sees it.
pub const HOST_CID: u64 = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 64];

/// A connection the host asks for, to `port` in the guest.
pub(crate) struct ConnectRequest {
    pub port: u32,
    pub stream: UnixStream,
    /// Bytes delivered to the guest before anything read from `stream`.
    pub prefix: Vec<u8>,
    /// Whether to write `OK <local port>\n` to `stream` once the guest accepts.
    pub announce: bool,
}

#[derive(Default)]
pub(crate) struct Requests {
    pub connects: Vec<ConnectRequest>,
    pub listeners: HashMap<u32, Sender<UnixStream>>,
}

/// State shared by the host-side handle and the device's worker.
pub(crate) struct Shared {
    pub requests: Mutex<Requests>,
    /// Wakes the worker when a request is queued.
    pub wake: EventFd,
}

/// The host side of one VM's vsock device: connect to guest ports and serve
/// host ports in-process. Cheap to clone.
#[derive(Clone)]
pub struct VsockHost {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VsockHost")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot create a socket pair: {0}")]
    Socket(std::io::Error),
    #[error("nothing in the guest accepted a connection to vsock port {0}")]
    Refused(u32),
    #[error("the guest did not answer a connection to vsock port {0} within {1:?}")]
    Timeout(u32, Duration),
}

impl VsockHost {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                requests: Mutex::new(Requests::default()),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    fn submit(&self, req: ConnectRequest) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connects
            .push(req);
        let _ = self.shared.wake.write(1);
    }

    /// Connects to `port` in the guest and returns the stream once the guest
    /// has accepted.
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
        let (ours, theirs) = UnixStream::pair().map_err(ConnectError::Socket)?;
        self.submit(ConnectRequest {
            port,
            stream: theirs,
            prefix: Vec::new(),
            announce: true,
        });
        ours.set_read_timeout(Some(timeout))
            .map_err(ConnectError::Socket)?;
        // Read the acknowledgement byte by byte: nothing after it may be consumed.
        let mut line = Vec::new();
        let mut reader = BufReader::with_capacity(1, &ours);
        match reader.read_until(b'\n', &mut line) {
            Ok(_) if line.starts_with(b"OK ") => {}
            Ok(_) => return Err(ConnectError::Refused(port)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnectError::Timeout(port, timeout))
            }
            Err(_) => return Err(ConnectError::Refused(port)),
        }
        drop(reader);
        ours.set_read_timeout(None).map_err(ConnectError::Socket)?;
        Ok(ours)
    }

    /// Hands `stream` itself to the guest's `port`: the device reads and
    /// writes it directly, after delivering `prefix`. If the guest refuses,
    /// `stream` is closed.
    pub fn attach(&self, port: u32, stream: UnixStream, prefix: Vec<u8>) {
        self.submit(ConnectRequest {
            port,
            stream,
            prefix,
            announce: false,
        });
    }

    /// Serves host `port` in-process: each guest connection to it arrives on
    /// the returned channel.
    pub fn listen(&self, port: u32) -> Receiver<UnixStream> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .listeners
            .insert(port, tx);
        rx
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use muxer::{Turn, FIRST_LOCAL_PORT};

#[cfg(any(test, feature = "fuzzing"))]
impl VsockHost {
    /// A muxer on the caller's thread, for the fuzz driver to turn.
    pub(crate) fn muxer(
        &self,
        mem: GuestMemory,
        rx: Queue,
        tx: Queue,
        guest_cid: u64,
    ) -> std::io::Result<muxer::Muxer> {
        let fd = || EventFd::new(libc::EFD_NONBLOCK);
        muxer::Muxer::new(
            muxer::Setup {
                mem,
                rx,
                tx,
                kicks: vec![fd()?, fd()?, fd()?],
                interrupt: Arc::new(Interrupt::new(fd()?)),
                stop: fd()?,
                guest_cid,
                uds_path: None,
                listener: None,
                reserved: vec![],
            },
            self.shared.clone(),
        )
    }
}

/// How the VM's vsock device is set up.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's address (3 or more).
    pub guest_cid: u32,
    /// Where to offer the hybrid Unix socket, if anywhere.
    pub uds_path: Option<PathBuf>,
    /// Guest ports the hybrid socket may not connect to (sbx's own services).
    pub reserved_ports: Vec<u32>,
    pub host: VsockHost,
}

pub struct Vsock {
    config: VsockConfig,
    /// Bound before the guest boots, so that clients can connect at once.
    listener: Option<Arc<std::os::unix::net::UnixListener>>,
    worker: Option<WorkerThread>,
}

impl Vsock {
    pub fn new(config: VsockConfig) -> std::io::Result<Self> {
        let listener = match &config.uds_path {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = std::os::unix::net::UnixListener::bind(path)?;
                l.set_nonblocking(true)?;
                Some(Arc::new(l))
            }
            None => None,
        };
        Ok(Self {
            config,
            listener,
            worker: None,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(
            &u64::from(self.config.guest_cid).to_le_bytes(),
            offset,
            data,
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let [rx, tx, _event]: [Queue; 3] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 3,
                })?;
        let (stop, worker_stop) = WorkerThread::stop_fds()?;
        let muxer = muxer::Muxer::new(
            muxer::Setup {
                mem,
                rx,
                tx,
                kicks,
                interrupt,
                stop: worker_stop,
                guest_cid: u64::from(self.config.guest_cid),
                uds_path: self.config.uds_path.clone(),
                listener: self.listener.clone(),
                reserved: self.config.reserved_ports.clone(),
            },
            self.config.host.shared.clone(),
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerThread::start(
            "sbx-vsock",
            sbx_seccomp::Kind::Vsock,
            stop,
            move || muxer.run(),
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        if let Some(path) = &self.config.uds_path {
            let _ = std::fs::remove_file(path);
        }
    }
}
