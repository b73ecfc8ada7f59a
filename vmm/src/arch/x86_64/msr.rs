//! Model-specific registers set before the first entry, so that no stale
//! host-side value leaks into the guest's syscall and TSC state.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("cannot read KVM's list of MSRs: {0}")]
    IndexList(kvm_ioctls::Error),
    #[error("cannot build the MSR list: {0}")]
    Build(String),
    #[error("KVM refused the boot MSRs: {0}")]
    Set(kvm_ioctls::Error),
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Partial { set: usize, wanted: usize },
}

/// The boot MSR values, restricted to those this KVM knows.
pub fn boot_msr_entries(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

pub fn setup_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), MsrError> {
    let list = kvm.get_msr_index_list().map_err(MsrError::IndexList)?;
    let entries = boot_msr_entries(list.as_slice());
    let msrs = Msrs::from_entries(&entries).map_err(|e| MsrError::Build(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_msrs_are_skipped() {
        let entries = boot_msr_entries(&[MSR_LSTAR, MSR_IA32_MISC_ENABLE]);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].data, MISC_ENABLE_FAST_STRING);
    }
}
