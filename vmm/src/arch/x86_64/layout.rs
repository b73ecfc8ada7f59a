//! Guest physical memory layout. Everything the VMM writes before the first
//! vCPU entry lives below 1 MiB; the kernel is loaded at `HIMEM_START`.

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty: the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params` ("zero page") handed to the kernel in %rsi.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables: PML4, PDPT and one page directory of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line and its maximum size (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the MP table goes here, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole; the kernel image is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap below 4 GiB: no RAM is placed here (IOAPIC, LAPIC, virtio-mmio).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each from here, inside the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Their interrupts: IOAPIC pins from here (0-4 are the legacy devices').
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Default addresses of the interrupt controllers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Highest address the kernel accepts for the initrd (`initrd_addr_max` of 64-bit kernels).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// KVM needs three pages for the TSS somewhere the guest does not use.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Guest RAM regions for `size` bytes of memory, leaving the MMIO gap empty.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        let big = ram_regions(4 << 30);
        assert_eq!(big[0], (0, MMIO_GAP_START));
        assert_eq!(big[1].0, MMIO_GAP_END);
        assert_eq!(big[0].1 + big[1].1, 4 << 30);
    }
}
