//! Guest packets and host sockets through the vsock muxer: nothing
//! panics and the muxer stays inside its bounds after every step.
//! The script format and the checks are in `vmm::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzzing::vsock_muxer(data));
