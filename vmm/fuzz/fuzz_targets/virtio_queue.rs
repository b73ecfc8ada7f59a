//! The virtio-mmio transport, the split virtqueue and the block device's
//! requests from a hostile driver: nothing panics, a read-only disk never
//! changes and no disk changes size.
//! The script format and the checks are in `vmm::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzzing::virtio_queue(data));
