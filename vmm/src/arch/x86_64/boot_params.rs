//! The Linux x86 boot protocol's zero page: command line, initrd and the e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{GuestAddress, GuestMemory};

use super::layout::{CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("too many memory regions for the e820 map")]
    TooManyRegions,
    #[error("cannot write the boot parameters into guest memory: {0}")]
    Write(linux_loader::configurator::Error),
}

/// Where the initrd was placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Builds the zero page. `regions` are the guest's RAM regions (start, length).
pub fn build(
    regions: &[(u64, u64)],
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }

    // Below 1 MiB only conventional memory up to the EBDA is RAM; the MP table
    // and the legacy hole above it stay out of the map.
    let mut map = vec![(0, EBDA_START)];
    for &(start, len) in regions {
        let (from, end) = (start.max(HIMEM_START), start + len);
        if end > from {
            map.push((from, end - from));
        }
    }
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyRegions);
    }
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

pub fn write<M: GuestMemory>(mem: &M, params: &boot_params) -> Result<(), BootParamsError> {
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_regions;

    #[test]
    fn e820_has_low_memory_and_high_memory() {
        let p = build(&ram_regions(256 << 20), 10, None).unwrap();
        assert_eq!(p.e820_entries, 2);
        let (lo, hi) = (p.e820_table[0], p.e820_table[1]);
        assert_eq!(({ lo.addr }, { lo.size }), (0, EBDA_START));
        assert_eq!(
            ({ hi.addr }, { hi.size }),
            (HIMEM_START, (256 << 20) - HIMEM_START)
        );
        assert_eq!({ p.hdr.cmdline_size }, 10);
    }

    #[test]
    fn e820_skips_mmio_gap() {
        let p = build(&ram_regions(5 << 30), 1, None).unwrap();
        assert_eq!(p.e820_entries, 3);
        let top = p.e820_table[2];
        assert_eq!({ top.addr }, 1 << 32);
        assert_eq!({ top.size }, (5u64 << 30) - 0xc000_0000);
    }

    #[test]
    fn initrd_is_recorded() {
        let p = build(
            &ram_regions(64 << 20),
            1,
            Some(InitrdPlacement {
                addr: 0x300_0000,
                size: 1234,
            }),
        )
        .unwrap();
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
    }
}
