//! The KVM VM: capability checks, in-kernel interrupt controllers and memory slots.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemory as _, GuestMemoryRegion};

use super::memory::GuestMemory;
use crate::arch::x86_64::layout::KVM_TSS_ADDR;

const KVM_API_VERSION: i32 = 12;
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source}")]
    OpenKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    #[error("this KVM lacks {0}, which sbx needs; use a newer host kernel")]
    MissingCap(&'static str),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new(kvm_path: &Path) -> Result<Vm, VmError> {
        let kvm = crate::host::open_kvm(kvm_path).map_err(|source| VmError::OpenKvm {
            path: kvm_path.display().to_string(),
            source,
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;
        Ok(Vm { kvm, fd })
    }

    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `mem`, which outlives the VM's vCPUs
            // (they are joined before `mem` is dropped), and slots do not overlap.
            unsafe { self.fd.set_user_memory_region(region_desc) }.map_err(|source| {
                VmError::Kvm {
                    what: "register guest memory",
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The largest vCPU count this KVM allows.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}
