//! virtio-blk: a raw disk image file served to the guest as a block device.
//! A session's root image is one, read-only and shared by every session
//! made from it; its writable layer is another, read-write and its own.
//!
//! Requests are read from the guest's descriptor chains and checked in
//! [`request`] before the file is touched: a hostile driver can at most
//! read and write the sectors of the disks it was given.

mod request;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::{
    answer_all, check_queues, read_config_bytes, start_queue_worker, ActivateError, Interrupt,
    VirtioDevice, WorkerThread, VIRTIO_F_VERSION_1,
};
use crate::vstate::memory::GuestMemory;
use request::{byte_range, Invalid, Kind, Request, SECTOR};

pub const DEVICE_TYPE: u32 = 2;
const QUEUE_SIZES: [u16; 1] = [256];
/// The serial number the guest reads with GET_ID (`/sys/block/vdX/serial`).
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// A raw image: its size is the disk's, rounded down to 512 bytes.
    pub path: PathBuf,
    pub read_only: bool,
    /// At most 20 bytes; how the guest tells its disks apart.
    pub serial: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the disk image {} is smaller than one 512-byte sector", path.display())]
    Empty { path: PathBuf },
    #[error("the disk image {} is in use by another VM; stop that session first", path.display())]
    InUse { path: PathBuf },
    #[error("the disk serial `{0}` is longer than 20 bytes")]
    Serial(String),
}

/// The host side of one disk: the file and what the guest was told of it.
struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
}

impl Disk {
    fn open(config: &BlockConfig) -> Result<Disk, BlockError> {
        let err = |source| BlockError::Open {
            path: config.path.clone(),
            source,
        };
        if config.serial.len() > SERIAL_LEN {
            return Err(BlockError::Serial(config.serial.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(err)?;
        // Many VMs may read an image; only one may write one, and none may
        // read while one writes.
        let lock = if config.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::InUse {
                    path: config.path.clone(),
                }
            } else {
                err(e)
            });
        }
        let sectors = file.metadata().map_err(err)?.len() / SECTOR;
        if sectors == 0 {
            return Err(BlockError::Empty {
                path: config.path.clone(),
            });
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        Ok(Disk {
            file,
            sectors,
            read_only: config.read_only,
            serial,
        })
    }

    /// Carries out `request`; returns its status and the bytes written into
    /// the guest's buffers.
    fn execute(&self, mem: &GuestMemory, request: &Request) -> (u32, u32) {
        match self.try_execute(mem, request) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(Failure::Invalid(why)) => {
                tracing::debug!(?why, kind = ?request.kind, "virtio-blk: refused a request");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(Failure::Io(e)) => {
                tracing::warn!(error = %e, kind = ?request.kind, "virtio-blk: disk I/O failed");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn try_execute(&self, mem: &GuestMemory, request: &Request) -> Result<u32, Failure> {
        let len = request.data_len();
        match request.kind {
            Kind::Read => {
                let (mut at, _) = byte_range(request.sector, len / SECTOR, self.sectors)?;
                let mut file = &self.file;
                for &(addr, n) in &request.data {
                    file.seek(SeekFrom::Start(at))?;
                    mem.read_exact_volatile_from(addr, &mut file, n as usize)
                        .map_err(guest_memory)?;
                    at += u64::from(n);
                }
                // Bounded by SEG_MAX buffers of at most 4 GiB each; the
                // used length is what the guest may look at, so cap it.
                Ok(u32::try_from(len).unwrap_or(u32::MAX))
            }
            Kind::Write => {
                self.writable()?;
                let (mut at, _) = byte_range(request.sector, len / SECTOR, self.sectors)?;
                let mut file = &self.file;
                for &(addr, n) in &request.data {
                    file.seek(SeekFrom::Start(at))?;
                    mem.write_all_volatile_to(addr, &mut file, n as usize)
                        .map_err(guest_memory)?;
                    at += u64::from(n);
                }
                Ok(0)
            }
            Kind::Flush => {
                if !self.read_only {
                    self.file.sync_data()?;
                }
                Ok(0)
            }
            Kind::GetId => {
                let mut left: &[u8] = &self.serial;
                let mut written = 0;
                for &(addr, n) in &request.data {
                    let (now, rest) = left.split_at(left.len().min(n as usize));
                    mem.write_slice(now, addr).map_err(guest_memory)?;
                    written += now.len() as u32;
                    left = rest;
                }
                Ok(written)
            }
            Kind::Discard => {
                self.writable()?;
                for (sector, sectors) in request::discard_segments(mem, request)? {
                    let (offset, len) = byte_range(sector, sectors, self.sectors)?;
                    self.punch_hole(offset, len)?;
                }
                Ok(0)
            }
            Kind::Other(_) => Err(Failure::Unsupported),
        }
    }

    fn writable(&self) -> Result<(), Failure> {
        if self.read_only {
            return Err(Failure::Invalid(Invalid::ReadOnly));
        }
        Ok(())
    }

    /// Gives the range's blocks back to the host file system: the image
    /// file stays sparse as the guest deletes.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Failure> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Failure::Invalid(Invalid::OutOfRange));
        };
        // SAFETY: fallocate on a descriptor we own; the range was checked
        // against the disk's size.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A file system without holes: the data stays, which discard allows.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(Failure::Io(e));
            }
        }
        Ok(())
    }
}

enum Failure {
    Unsupported,
    Invalid(Invalid),
    Io(std::io::Error),
}

impl From<Invalid> for Failure {
    fn from(why: Invalid) -> Failure {
        Failure::Invalid(why)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// A buffer outside guest memory is the driver's fault, not the disk's.
fn guest_memory(_: vm_memory::GuestMemoryError) -> Failure {
    Failure::Invalid(Invalid::OutOfRange)
}

pub struct Block {
    disk: Arc<Disk>,
    worker: Option<WorkerThread>,
}

impl Block {
    pub fn new(config: &BlockConfig) -> Result<Block, BlockError> {
        Ok(Block {
            disk: Arc::new(Disk::open(config)?),
            worker: None,
        })
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Block {
    /// Serves a queue on the caller's thread, as the worker would: for
    /// the fuzz driver, which decides when.
    pub(crate) fn server(&self) -> impl Fn(&GuestMemory, &mut Queue, &Interrupt) {
        let disk = self.disk.clone();
        move |mem, queue, interrupt| serve(&disk, mem, queue, interrupt)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = VIRTIO_F_VERSION_1
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config, up to the discard fields.
        let mut cfg = [0u8; 48];
        cfg[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&request::SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment
        // (in sectors: the host's 4 KiB blocks are what a hole frees).
        cfg[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        cfg[40..44].copy_from_slice(&request::DISCARD_SEG_MAX.to_le_bytes());
        cfg[44..48].copy_from_slice(&8u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
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
        let disk = self.disk.clone();
        self.worker = Some(start_queue_worker(
            "sbx-blk",
            "virtio-blk",
            sbx_seccomp::Kind::Block,
            (mem, queues, kicks, interrupt),
            move |mem, queue, interrupt| serve(&disk, mem, queue, interrupt),
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Answers every request in `queue`, then interrupts once.
fn serve(disk: &Disk, mem: &GuestMemory, queue: &mut Queue, interrupt: &Interrupt) {
    answer_all("virtio-blk", mem, queue, interrupt, |chain| {
        let descs: Vec<_> = chain.collect();
        match request::parse(mem, &descs) {
            Err(why) => {
                tracing::debug!(?why, "virtio-blk: a request with nowhere to answer");
                0
            }
            Ok(parsed) => {
                let (status, written) = match &parsed.request {
                    Ok(req) => disk.execute(mem, req),
                    Err(why) => {
                        tracing::debug!(?why, "virtio-blk: a malformed request");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                };
                match mem.write_obj(status as u8, parsed.status) {
                    Ok(()) => written.saturating_add(1),
                    Err(_) => 0,
                }
            }
        }
    })
}
