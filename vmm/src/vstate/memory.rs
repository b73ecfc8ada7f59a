//! Guest RAM: anonymous, lazily-populated mappings (only pages the guest
//! touches cost host memory), aligned for huge pages.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemory as _, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::ram_regions;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
#[error("cannot map {mib} MiB of guest memory: {detail}")]
pub struct MemoryError {
    pub mib: u64,
    pub detail: String,
}

pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    let err = |detail: String| MemoryError { mib, detail };
    let regions = ram_regions(mib << 20)
        .into_iter()
        .map(|(start, len)| map_region(GuestAddress(start), len as usize).map_err(err))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemory::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// The size of an x86-64 huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Maps one region of guest RAM at a host address 2 MiB-aligned like its
/// guest address, and offers it to transparent huge pages: KVM maps guest
/// memory with large pages only where both line up, and a boot then takes
/// far fewer page faults (each a VM exit). vm-memory's own mappings land
/// wherever the kernel puts them.
///
/// The mapping is never unmapped: a session process runs one VM for its
/// whole life, and a device thread may hold guest memory until the end.
fn map_region(start: GuestAddress, len: usize) -> Result<GuestRegionMmap<()>, String> {
    if !start.0.is_multiple_of(HUGE_PAGE as u64) {
        return Err(format!("region at {:#x} is not 2 MiB-aligned", start.0));
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| format!("a region of {len} bytes is too large"))?;
    // SAFETY: a new anonymous mapping; no existing memory is touched.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let base = base as usize;
    let aligned = base.next_multiple_of(HUGE_PAGE);
    let head = aligned - base;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the reservation just made and outside
    // the aligned part kept; nothing else refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: with transparent huge pages off it fails, harmlessly.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    keep_to_itself(aligned as *mut u8, len);
    // SAFETY: `aligned..aligned + len` is the live anonymous mapping made
    // above, and it stays mapped for the life of the process.
    let mapping = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(aligned as *mut u8) }
        .with_mmap_prot(prot)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| e.to_string())?;
    GuestRegionMmap::new(mapping, start)
        .ok_or_else(|| format!("region at {:#x} overflows", start.0))
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
    fn guest_ram_is_aligned_for_huge_pages() {
        let mem = create(4096).unwrap();
        assert!(mem.num_regions() > 1, "RAM below and above the 32-bit gap");
        for region in mem.iter() {
            let host = region.as_ptr() as u64;
            assert_eq!(
                host % HUGE_PAGE as u64,
                region.start_addr().0 % HUGE_PAGE as u64
            );
        }
        mem.write_obj(7u8, GuestAddress(299 << 20)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(299 << 20)).unwrap(), 7);
    }

    #[test]
    fn resident_counts_touched_pages_only() {
        let mem = create(64).unwrap();
        // Counted in small pages here: a huge page would make a touch 2 MiB.
        for region in mem.iter() {
            // SAFETY: advice on a live mapping owned by `mem`.
            unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_NOHUGEPAGE,
                )
            };
        }
        let before = resident_bytes(&mem);
        for i in 0..10u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096 * 16)).unwrap();
        }
        let after = resident_bytes(&mem);
        assert_eq!(after - before, 10 * 4096);
    }
}
