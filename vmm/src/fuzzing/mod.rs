//! What the fuzz targets in `vmm/fuzz` drive: each entry point reads a
//! hostile driver's script out of the fuzzer's bytes and plays it against
//! one device's guest-facing code, synchronously (no worker thread, no
//! epoll), so a crash reproduces from its input alone. Each also checks
//! what the device promises the host, so a fuzzer finds broken promises,
//! not only panics:
//! - [`virtio_queue`]: the virtio-mmio transport, the split virtqueue and
//!   the block device's requests; a read-only disk never changes and no
//!   disk ever grows.
//! - [`vsock_muxer`]: guest packets and host sockets through the vsock
//!   muxer; its connection table and buffers stay within their bounds.
//! - [`fs_requests`]: FUSE requests through the share's guard to a real
//!   host directory; nothing outside the share changes, a denied file's
//!   bytes never reach the guest, and no special file, setuid bit or
//!   absolute symlink appears in the share.
//!
//! Built only for tests and with the `fuzzing` feature.

mod fs;
mod queue;
mod script;
mod vsock;

use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{self, GuestMemory};
pub use fs::fs_requests;
pub use queue::virtio_queue;
pub use script::{Script, Writer};
pub use vsock::vsock_muxer;

/// Guest memory the scripts address: 1 MiB, rings and buffers in it.
pub(crate) const MEM_LEN: u64 = 1 << 20;
/// Where each target's rings start, and where its buffers may go.
const RING_BASE: u64 = 0x1000;
const HEAP_BASE: u64 = 0x10_000;

/// Guest memory for one input, zeroed: one mapping per process, since
/// guest RAM is never unmapped.
fn guest_memory() -> GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    static ZEROS: [u8; MEM_LEN as usize] = [0; MEM_LEN as usize];
    let mem = MEM
        .get_or_init(|| {
            // As in every Rust binary (sbx's session process among them), a
            // write to a closed socket is an error, not a fatal signal; the
            // fuzzer's own main does not set that up.
            // SAFETY: changes this process's SIGPIPE disposition only.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            memory::create(MEM_LEN >> 20).expect("cannot map 1 MiB of guest memory")
        })
        .clone();
    mem.write_slice(&ZEROS, GuestAddress(0))
        .expect("guest memory is 1 MiB");
    mem
}

/// A chain of 1 to `most` descriptors as a hostile driver writes them:
/// any address, any length below 128 KiB, either direction, sometimes
/// INDIRECT.
fn raw_chain(s: &mut Script, most: u8) -> Vec<(u64, u32, u16)> {
    let n = 1 + usize::from(s.u8() % most);
    (0..n)
        .map(|_| (s.addr(MEM_LEN), s.u32() % 0x2_0000, u16::from(s.u8() & 6)))
        .collect()
}

/// Hands out guest buffers from [`HEAP_BASE`] up, wrapping around.
struct Heap(u64);

impl Heap {
    fn new() -> Self {
        Heap(HEAP_BASE)
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.next_multiple_of(16);
        if self.0 + len > MEM_LEN {
            self.0 = HEAP_BASE;
        }
        let at = self.0;
        self.0 = (self.0 + len).min(MEM_LEN);
        at
    }

    /// Writes `bytes` into a fresh buffer and returns its address.
    fn put(&mut self, mem: &GuestMemory, bytes: &[u8]) -> u64 {
        let at = self.alloc(bytes.len() as u64);
        let end = (MEM_LEN - at) as usize;
        let _ = mem.write_slice(&bytes[..bytes.len().min(end)], GuestAddress(at));
        at
    }
}

/// A temporary directory for one fuzzing process, removed when it ends.
struct ProcessDir(std::path::PathBuf);

impl ProcessDir {
    fn new(what: &str) -> ProcessDir {
        // Memory-backed where the host has it: each input lays out files anew.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("sbx-fuzz-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot make a temporary directory");
        ProcessDir(dir)
    }
}

impl Drop for ProcessDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every target over its seeds and over short random-looking inputs: the
/// harnesses run on stable in the ordinary test suite.
#[cfg(test)]
mod tests {
    use super::*;

    type Target = fn(&[u8]);

    fn targets() -> [(&'static str, Target, Vec<Vec<u8>>); 3] {
        [
            ("virtio_queue", virtio_queue, queue::seeds()),
            ("vsock_muxer", vsock_muxer, vsock::seeds()),
            ("fs_requests", fs_requests, fs::seeds()),
        ]
    }

    #[test]
    fn every_target_runs_its_seeds_and_noise() {
        for (name, target, seeds) in targets() {
            assert!(!seeds.is_empty(), "{name} has no seeds");
            for seed in &seeds {
                target(seed);
            }
            // A fixed generator: the same noise every run.
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for len in [0usize, 1, 7, 64, 512, 4096] {
                for _ in 0..20 {
                    let noise: Vec<u8> = (0..len)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect();
                    target(&noise);
                }
            }
        }
    }

    /// Writes the seeds into `vmm/fuzz/corpus/<target>/`:
    /// `cargo test -p vmm fuzzing::tests::write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes the fuzz corpus's seeds into the checkout"]
    fn write_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, _, seeds) in targets() {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
    }
}
