//! Segment descriptors for the flat 64-bit boot environment.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS. Selectors are index * 8.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

/// Decodes a GDT entry into the segment form KVM expects in `kvm_sregs`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    if granularity == 1 {
        // Limit is in 4 KiB units.
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes_as_long_mode() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn null_entry_is_unusable() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(seg.unusable, 1);
        assert_eq!(seg.present, 0);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, 3);
        assert_eq!(seg.base, 0x1234_5678);
        // 0x808b has the granularity bit: the limit counts 4 KiB pages.
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, (0xabcde << 12) | 0xfff);
        let bytes = kvm_segment_from_gdt(gdt_entry(0x008b, 0, 0xabcde), 3);
        assert_eq!((bytes.g, bytes.limit), (0, 0xabcde));
    }
}
