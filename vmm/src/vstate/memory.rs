//! Guest RAM: anonymous, lazily-populated mappings (only pages the guest
//! touches cost host memory).

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError {
        mib,
        detail: e.to_string(),
    })
}
