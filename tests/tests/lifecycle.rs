//! The VMM library leaves nothing behind: after several boots in one process,
//! its threads and file descriptors are back where they started.

use std::path::PathBuf;
use std::time::Instant;

use vmm::{BootTimings, Console, VmConfig};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The artifact `cargo xtask test` built, which it names in `var`.
fn artifact(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set; run the real-guest tests with `cargo xtask test`")
    })
}

#[test]
fn repeated_boots_leak_no_threads_or_fds() {
    sbx_tests::require_real_kvm();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 quiet{} -- true",
        if vmm::host::nested_under_tcg() {
            " noxsave"
        } else {
            ""
        }
    );
    let config = VmConfig {
        kvm_path: PathBuf::from("/dev/kvm"),
        kernel: artifact("SBX_KERNEL"),
        initrd: Some(artifact("SBX_INITRD")),
        cmdline,
        vcpus: 2,
        mem_mib: 128,
        lifetime: None,
        vsock: None,
        fs: Vec::new(),
        block: Vec::new(),
        pause: None,
    };
    let boot = || {
        let console = Console {
            output: Box::new(std::io::sink()),
            input: None,
        };
        let outcome = vmm::run(&config, console, BootTimings::new(Instant::now())).unwrap();
        assert!(outcome.reason.is_clean(), "{}", outcome.reason);
        assert_eq!(outcome.guest_status, Some(0));
    };
    // The first boot may set up process-wide state (the kick signal handler).
    boot();
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    for _ in 0..3 {
        boot();
    }
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
}
