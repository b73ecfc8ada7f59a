//! CPUID as each vCPU sees it: KVM's supported set, with the topology and
//! identity fields rewritten so that vCPU `n` of `count` looks like one core of
//! a single-socket machine with APIC id `n`, on Intel and AMD alike.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Twelve ASCII bytes spread over three CPUID registers, in the given order.
pub fn signature(regs: [u32; 3]) -> [u8; 12] {
    let mut id = [0u8; 12];
    for (chunk, r) in id.chunks_mut(4).zip(regs) {
        chunk.copy_from_slice(&r.to_le_bytes());
    }
    id
}

impl Vendor {
    /// Decodes the vendor string of CPUID leaf 0.
    pub fn from_leaf0(ebx: u32, edx: u32, ecx: u32) -> Vendor {
        match &signature([ebx, edx, ecx]) {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }

    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Vendor {
        entries
            .iter()
            .find(|e| e.function == LEAF_VENDOR)
            .map_or(Vendor::Other, |e| Vendor::from_leaf0(e.ebx, e.edx, e.ecx))
    }
}

/// Bits needed to hold `count` distinct ids.
fn id_bits(count: u32) -> u32 {
    (count.max(1) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
        .max(u32::from(count > 1))
}

/// Advertises the TSC-deadline timer (CPUID.1:ECX[24]), for a KVM that
/// emulates it.
pub fn advertise_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Rewrites `cpuid` in place for vCPU `apic_id` of `count`.
pub fn normalize(cpuid: &mut CpuId, apic_id: u8, count: u8) {
    let vendor = Vendor::from_cpuid(cpuid.as_slice());
    for e in cpuid.as_mut_slice() {
        normalize_entry(e, vendor, u32::from(apic_id), u32::from(count));
    }
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, vendor: Vendor, apic_id: u32, count: u32) {
    let shift = id_bits(count);
    match e.function {
        LEAF_FEATURES => {
            // EBX: initial APIC id, logical processor count, CLFLUSH size (8 quadwords).
            e.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
            // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this
            // cache - 1: one thread per core, the last level shared by all.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            e.edx = apic_id;
            match e.index {
                // SMT level: one thread per core.
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                // Core level: every vCPU is a core of the one package.
                1 => {
                    e.eax = shift;
                    e.ebx = count;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n;
                }
            }
        }
        LEAF_AMD_SIZE_IDS if vendor == Vendor::Amd => {
            // ECX[7:0]: cores - 1; ECX[15:12]: APIC id bits used for the core.
            e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1);
        }
        LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff; // compute unit id; one thread per unit
            e.ecx = 0; // node 0, one node
            e.edx = 0;
        }
        _ => {}
    }
}

/// The XCR0 value the guest would choose: every state component CPUID leaf 0xd advertises.
pub fn supported_xcr0(cpuid: &CpuId) -> Option<u64> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .filter(|mask| mask & 0x3 == 0x3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn id_bits_cover_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = entry(LEAF_FEATURES, 0);
        normalize_entry(&mut e, Vendor::Amd, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let mut single = entry(LEAF_FEATURES, 0);
        single.edx = EDX_HTT;
        normalize_entry(&mut single, Vendor::Intel, 0, 1);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_is_per_vcpu() {
        let mut smt = entry(LEAF_EXT_TOPOLOGY, 0);
        let mut core = entry(LEAF_EXT_TOPOLOGY, 1);
        let mut end = entry(LEAF_EXT_TOPOLOGY, 2);
        for e in [&mut smt, &mut core, &mut end] {
            normalize_entry(e, Vendor::Intel, 2, 4);
            assert_eq!(e.edx, 2);
        }
        assert_eq!((smt.ebx, smt.ecx), (1, 0x100));
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 4, 0x201));
        assert_eq!((end.ebx, end.ecx), (0, 2));
    }

    #[test]
    fn amd_core_count() {
        let mut e = entry(LEAF_AMD_SIZE_IDS, 0);
        e.ecx = 0xffff_ffff;
        normalize_entry(&mut e, Vendor::Amd, 0, 4);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
        assert_eq!(e.ecx >> 16, 0xffff);
    }

    #[test]
    fn intel_cache_leaf_shares_llc() {
        let mut l1 = entry(LEAF_CACHE_PARAMS, 0);
        l1.eax = (1 << 5) | 0x1;
        let mut l3 = entry(LEAF_CACHE_PARAMS, 3);
        l3.eax = (3 << 5) | 0x3;
        normalize_entry(&mut l1, Vendor::Intel, 0, 2);
        normalize_entry(&mut l3, Vendor::Intel, 0, 2);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 1);
        assert_eq!(l3.eax >> 26, 1);
    }

    #[test]
    fn vendor_is_decoded() {
        let mut e = entry(LEAF_VENDOR, 0);
        e.ebx = u32::from_le_bytes(*b"Auth");
        e.edx = u32::from_le_bytes(*b"enti");
        e.ecx = u32::from_le_bytes(*b"cAMD");
        assert_eq!(Vendor::from_cpuid(&[e]), Vendor::Amd);
        assert_eq!(Vendor::from_cpuid(&[]), Vendor::Other);
    }
}
