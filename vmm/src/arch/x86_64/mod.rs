//! x86_64 guest setup: memory layout, boot parameters, CPU state and the MP table.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
