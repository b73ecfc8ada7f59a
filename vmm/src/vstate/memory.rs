//! Guest RAM: anonymous, lazily-populated mappings (only pages the guest
//! touches cost host memory).

use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_regions;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
#[error("cannot map {mib} MiB of guest memory: {detail}")]
pub struct MemoryError {
    pub mib: u64,
    pub detail: String,
}

pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError {
        mib,
        detail: e.to_string(),
    })?;
    for region in mem.iter() {
        keep_to_itself(region.as_ptr(), region.len() as usize);
    }
    Ok(mem)
}

/// Guest RAM is never copied into a child process (the session process
/// runs none, but a future one must not get the guest's memory), and the
/// flag keeps the kernel from merging it with the VMM's own heap mappings,
/// so guest RAM is one mapping of its own size in /proc/PID/maps.
fn keep_to_itself(addr: *mut u8, len: usize) {
    // SAFETY: advises on a live mapping we own; no memory is changed.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTFORK) };
}

/// Bytes of guest memory resident on the host (pages the guest touched), by mincore(2).
pub fn resident_bytes(mem: &GuestMemory) -> u64 {
    const PAGE: usize = 4096;
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: the range is exactly one live mapping owned by `mem`; `vec`
        // has one byte per page as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * PAGE as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn resident_counts_touched_pages_only() {
        let mem = create(64).unwrap();
        let before = resident_bytes(&mem);
        for i in 0..10u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096 * 16)).unwrap();
        }
        let after = resident_bytes(&mem);
        assert_eq!(after - before, 10 * 4096);
    }
}
