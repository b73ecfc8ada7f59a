//! FUSE requests through a share's guard to a real host directory:
//! nothing panics, nothing outside the share changes, denied files' bytes
//! never reach guest memory, and no special file, setuid bit or absolute
//! symlink appears in the share.
//! The script format and the checks are in `vmm::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzzing::fs_requests(data));
