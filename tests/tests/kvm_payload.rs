//! The nested host's /dev/kvm really runs guest code: a 64-bit payload, in
//! long mode set up by the VMM's own boot code, writes a computed value to an
//! I/O port.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const CODE_ADDR: u64 = 0x10000;
const PORT: u16 = 0x3f8;

#[test]
fn long_mode_payload_writes_computed_value_to_port() {
    sbx_tests::require_real_kvm();
    // mov rax, 0x0000_0001_0000_0021 ; shr rax, 32 ; add al, 0x41 ; mov dx, PORT ; out dx, al ; hlt
    let code: &[u8] = &[
        0x48, 0xb8, 0x21, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov rax, imm64
        0x48, 0xc1, 0xe8, 0x20, // shr rax, 32
        0x04, 0x41, // add al, 0x41  -> 'B' only if the 64-bit shift happened
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    let host_addr = mem.iter().next().map(|r| r.as_ptr() as u64).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 0x20_0000,
        userspace_addr: host_addr,
        flags: 0,
    };
    // SAFETY: `mem` outlives the VM in this test.
    unsafe { vm.set_user_memory_region(region) }.unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    vmm::arch::x86_64::regs::setup_sregs(&mem, &vcpu).unwrap();
    vmm::arch::x86_64::regs::setup_regs(&vcpu, CODE_ADDR, 0).unwrap();

    let mut seen = None;
    for _ in 0..16 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, PORT);
                seen = Some(data[0]);
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(seen, Some(b'B'), "payload's port write");
}
