//! What PID 1 must do that no other process does.

use std::ffi::CString;
use std::sync::OnceLock;

/// The shares mounted at boot (guest paths).
static SHARES: OnceLock<Vec<String>> = OnceLock::new();

/// Where the host's shared directories are mounted.
pub fn shares() -> &'static [String] {
    SHARES.get().map_or(&[], Vec::as_slice)
}

/// True if `fstype` is mounted on `target` (now or already).
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> bool {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (src, tgt, fs, d) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            d.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // EBUSY: already mounted (e.g. by the kernel); anything else is worth a line.
        if err.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("sbx-guest-agent: cannot mount {fstype} on {target}: {err}");
            return false;
        }
    }
    true
}

pub fn mount_pseudo_filesystems() {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // Failures are reported by `mount`; the agent carries on without.
    mount("proc", "/proc", "proc", nodev, "");
    mount("sysfs", "/sys", "sysfs", nodev, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "ptmxmode=0666,mode=0620",
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
}

/// Mounts the host's shared directories: each is a virtio-fs device the
/// VMM serves, named on the kernel command line.
pub fn mount_shares(shares: &[sbx_protocol::cmdline::Share]) {
    let mut mounted = Vec::new();
    for share in shares {
        let target = share.guest_path.as_str();
        if let Err(e) = std::fs::create_dir_all(target) {
            eprintln!("sbx-guest-agent: cannot create {target}: {e}");
            continue;
        }
        // The device refuses writes to a read-only mount whatever the guest
        // does; the flag only makes the guest say so without asking.
        let ro = if share.read_only { libc::MS_RDONLY } else { 0 };
        let flags = libc::MS_NOSUID | libc::MS_NODEV | ro;
        if mount(&share.tag, target, "virtiofs", flags, "") {
            widen_readahead(target);
            mounted.push(target.trim_end_matches('/').to_string());
        }
    }
    let _ = SHARES.set(mounted);
}

/// Sequential reads of a share ask for 1 MiB at a time, the most a request
/// carries, instead of the kernel's 128 KiB: every request is a VM exit.
fn widen_readahead(target: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(target) else {
        return;
    };
    let dev = meta.dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&bdi, "1024") {
        eprintln!("sbx-guest-agent: cannot widen read-ahead of {target} ({bdi}): {e}");
    }
}

/// The guest's host name.
pub const HOSTNAME: &str = "sbx";

pub fn set_hostname(name: &str) {
    // SAFETY: passes a valid buffer and its length.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
}

pub fn sync() {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
}

/// Waits until what was written to the console has left the UART: the VM
/// ends as soon as the exit status is reported, which would cut off the
/// command's last output still queued in the tty.
pub fn drain_console() {
    for fd in [1, 2] {
        // SAFETY: tcdrain on our own standard descriptors; failure (not a
        // tty) is harmless.
        unsafe { libc::tcdrain(fd) };
    }
}

/// Flushes filesystems and reboots; with `reboot=k` the VMM sees the i8042
/// reset and ends the VM.
pub fn reboot() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot(2) only returns on error; there is nothing else PID 1 can do.
    loop {
        std::thread::park();
    }
}
