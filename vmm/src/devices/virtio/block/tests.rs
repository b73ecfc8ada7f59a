//! The block device driven by a hostile guest: raw descriptor chains
//! written into guest memory, as a guest with root could, and the disk
//! file checked afterwards.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Block, BlockConfig, BlockError};
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vstate::memory::{self, GuestMemory};

const DISK_SECTORS: u64 = 2048;

struct Guest {
    mem: GuestMemory,
    ring: Ring,
    kick: EventFd,
    dev: Block,
    heap: u64,
    _dir: TempDir,
    path: std::path::PathBuf,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(name: &str) -> (TempDir, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("sbx-blk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    // Sector n starts with the byte n % 251, the rest of the disk is zeros.
    for n in 0..DISK_SECTORS {
        let mut sector = [0u8; 512];
        sector[0] = (n % 251) as u8;
        f.write_all(&sector).unwrap();
    }
    (TempDir(dir), path)
}

impl Guest {
    fn new(name: &str, read_only: bool) -> Guest {
        let (dir, path) = disk(name);
        let mut dev = Block::new(&BlockConfig {
            path: path.clone(),
            read_only,
            serial: "sbx-test-disk".into(),
        })
        .unwrap();
        let mem = memory::create(32).unwrap();
        let ring = Ring::at(0x10_000);
        let kick = EventFd::new(0).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            vec![ring.queue()],
            vec![kick.try_clone().unwrap()],
            irq,
        )
        .unwrap();
        Guest {
            mem,
            ring,
            kick,
            dev,
            heap: 0x100_000,
            _dir: dir,
            path,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.heap;
        self.heap += (len + 511) & !511;
        at
    }

    fn header(&mut self, type_: u32, sector: u64) -> u64 {
        let h = self.alloc(16);
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&type_.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(h)).unwrap();
        h
    }

    /// Posts `descs`, kicks, and waits for the device to use the chain;
    /// returns the used length.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        self.ring.post(&self.mem, descs);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((_, len)) = self.ring.take_used(&self.mem).pop() {
                return len;
            }
            assert!(Instant::now() < deadline, "the device did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A request with one data buffer; returns (status, used length).
    fn request(&mut self, type_: u32, sector: u64, data: u64, len: u32, flags: u16) -> (u8, u32) {
        let h = self.header(type_, sector);
        let s = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(s)).unwrap();
        let used = if len == 0 {
            self.submit(&[(h, 16, 0), (s, 1, WRITE)])
        } else {
            self.submit(&[(h, 16, 0), (data, len, flags), (s, 1, WRITE)])
        };
        (self.mem.read_obj(GuestAddress(s)).unwrap(), used)
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let d = self.alloc(u64::from(len));
        let (status, _) = self.request(VIRTIO_BLK_T_IN, sector, d, len, WRITE);
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(d)).unwrap();
        (status, buf)
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        let d = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(d)).unwrap();
        self.request(VIRTIO_BLK_T_OUT, sector, d, bytes.len() as u32, 0)
            .0
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn reads_writes_flushes_and_names_itself() {
    let mut g = Guest::new("rw", false);
    let mut cap = [0u8; 8];
    g.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(g.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);

    let (status, data) = g.read(7, 1024);
    assert_eq!(status, OK);
    assert_eq!((data[0], data[512]), (7, 8));

    assert_eq!(g.write(100, &[0xab; 1024]), OK);
    let file = g.file();
    assert!(file[100 * 512..102 * 512].iter().all(|b| *b == 0xab));
    assert_eq!(file[102 * 512], 102);

    let (status, _) = g.request(VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    assert_eq!(status, OK);

    let id = g.alloc(20);
    let (status, used) = g.request(VIRTIO_BLK_T_GET_ID, 0, id, 20, WRITE);
    assert_eq!((status, used), (OK, 21));
    let mut serial = [0u8; 13];
    g.mem.read_slice(&mut serial, GuestAddress(id)).unwrap();
    assert_eq!(&serial, b"sbx-test-disk");

    let (status, _) = g.request(VIRTIO_BLK_T_SCSI_CMD, 0, 0, 0, 0);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn a_read_only_disk_refuses_every_write() {
    let mut g = Guest::new("ro", true);
    assert_ne!(g.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let before = g.file();
    assert_eq!(g.write(0, &[1; 512]), IOERR);
    let seg = g.alloc(16);
    let mut b = [0u8; 16];
    b[8..12].copy_from_slice(&8u32.to_le_bytes());
    g.mem.write_slice(&b, GuestAddress(seg)).unwrap();
    let (status, _) = g.request(VIRTIO_BLK_T_DISCARD, 0, seg, 16, 0);
    assert_eq!(status, IOERR);
    assert_eq!(g.file(), before);
    // Reading still works.
    assert_eq!(
        g.read(3, 512),
        (OK, {
            let mut s = vec![0u8; 512];
            s[0] = 3;
            s
        })
    );
}

#[test]
fn requests_outside_the_disk_or_malformed_are_refused() {
    let mut g = Guest::new("hostile", false);
    let before = g.file();
    // Past the end, straddling it, and a sector number that overflows.
    assert_eq!(g.write(DISK_SECTORS, &[1; 512]), IOERR);
    assert_eq!(g.write(DISK_SECTORS - 1, &[1; 1024]), IOERR);
    assert_eq!(g.write(u64::MAX / 512 + 1, &[1; 512]), IOERR);
    assert_eq!(g.write(u64::MAX, &[1; 512]), IOERR);
    assert_eq!(g.read(DISK_SECTORS, 512).0, IOERR);
    // Not a whole number of sectors.
    assert_eq!(g.write(0, &[1; 100]), IOERR);
    // A read into a buffer the device may not write, a write from one it may
    // only write: both the wrong way round.
    let d = g.alloc(512);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, d, 512, 0).0, IOERR);
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, d, 512, WRITE).0, IOERR);
    // A buffer outside guest memory.
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, 1 << 40, 512, 0).0, IOERR);
    // A header the device may write, or too short.
    let h = g.header(VIRTIO_BLK_T_OUT, 0);
    let s = g.alloc(1);
    g.submit(&[(h, 16, WRITE), (s, 1, WRITE)]);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(s)).unwrap(), IOERR);
    g.submit(&[(h, 8, 0), (s, 1, WRITE)]);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(s)).unwrap(), IOERR);
    // No status byte to write: the chain is returned untouched.
    assert_eq!(g.submit(&[(h, 16, 0)]), 0);
    assert_eq!(g.submit(&[(h, 16, 0), (d, 512, 0)]), 0);
    // Too many segments.
    let mut descs = vec![(g.header(VIRTIO_BLK_T_OUT, 0), 16, 0)];
    for _ in 0..=super::request::SEG_MAX {
        descs.push((d, 512, 0));
    }
    let s = g.alloc(1);
    descs.push((s, 1, WRITE));
    g.submit(&descs);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(s)).unwrap(), IOERR);

    assert_eq!(g.file(), before, "a refused request changed the disk");
    // The device still serves after all that.
    assert_eq!(g.read(5, 512).0, OK);
}

#[test]
fn discard_gives_blocks_back_to_the_host() {
    let mut g = Guest::new("discard", false);
    let blocks = || std::fs::metadata(&g.path).unwrap().blocks();
    let before = blocks();
    let seg = g.alloc(16);
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&0u64.to_le_bytes());
    b[8..12].copy_from_slice(&1024u32.to_le_bytes());
    g.mem.write_slice(&b, GuestAddress(seg)).unwrap();
    let (status, _) = g.request(VIRTIO_BLK_T_DISCARD, 0, seg, 16, 0);
    assert_eq!(status, OK);
    let after = std::fs::metadata(&g.path).unwrap().blocks();
    assert!(
        after < before,
        "{after} blocks after discard, {before} before"
    );
    assert_eq!(g.read(0, 512).1, vec![0u8; 512]);
    assert_eq!(g.read(1024, 512).1[0], (1024 % 251) as u8);
    // A segment past the end is refused.
    b[0..8].copy_from_slice(&(DISK_SECTORS - 8).to_le_bytes());
    b[8..12].copy_from_slice(&16u32.to_le_bytes());
    g.mem.write_slice(&b, GuestAddress(seg)).unwrap();
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, seg, 16, 0).0, IOERR);
}

#[test]
fn one_writer_per_disk() {
    let g = Guest::new("lock", false);
    let second = |read_only| {
        Block::new(&BlockConfig {
            path: g.path.clone(),
            read_only,
            serial: String::new(),
        })
    };
    assert!(matches!(second(false), Err(BlockError::InUse { .. })));
    assert!(matches!(second(true), Err(BlockError::InUse { .. })));
    drop(g);
    let (_dir, path) = disk("shared");
    let cfg = BlockConfig {
        path,
        read_only: true,
        serial: String::new(),
    };
    let _a = Block::new(&cfg).unwrap();
    let _b = Block::new(&cfg).unwrap();
}
