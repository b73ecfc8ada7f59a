//! Initial register state for entering a 64-bit Linux kernel directly.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write {what} into guest memory at {addr:#x}")]
    GuestWrite { what: &'static str, addr: u64 },
    #[error("KVM refused the vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Sets the general-purpose registers: entry point, boot stack and the zero page in %rsi.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, zero_page: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and must be set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| RegsError::Kvm {
        what: "general registers",
        source,
    })
}

/// x87 and SSE control words as after `FNINIT` and reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Kvm {
        what: "FPU state",
        source,
    })
}

/// Writes the GDT, IDT and identity page tables and puts the vCPU in long mode.
pub fn setup_sregs<M: GuestMemory>(mem: &M, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| RegsError::Kvm {
        what: "special registers (read)",
        source,
    })?;
    configure_segments(mem, &mut sregs)?;
    configure_page_tables(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(|source| RegsError::Kvm {
        what: "special registers",
        source,
    })
}

fn write<M: GuestMemory>(mem: &M, what: &'static str, addr: u64, v: u64) -> Result<(), RegsError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|_| RegsError::GuestWrite { what, addr })
}

fn configure_segments<M: GuestMemory>(mem: &M, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "GDT", GDT_ADDR + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", IDT_ADDR, 0)?;

    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel's
/// early entry code, which builds its own tables straight away.
fn configure_page_tables<M: GuestMemory>(mem: &M, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(mem, "PML4", PML4_ADDR, PDPT_ADDR | PRESENT_RW)?;
    write(mem, "PDPT", PDPT_ADDR, PD_ADDR | PRESENT_RW)?;
    for i in 0..512u64 {
        write(
            mem,
            "page directory",
            PD_ADDR + i * 8,
            (i << 21) | PRESENT_RW | HUGE,
        )?;
    }
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut sregs = kvm_sregs::default();
        configure_page_tables(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 511 << 21);
        assert_ne!(last & 0x80, 0, "2 MiB pages");
    }

    #[test]
    fn segments_enable_long_mode() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut sregs = kvm_sregs::default();
        configure_segments(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }
}
