//! Small system helpers the session process and its clients share:
//! signal masks, pipes, descriptor limits, a bounded wait for one line.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::error::{At, Result};

/// Blocks `signals` in this thread and every thread it starts afterwards;
/// returns the set, for sigwait.
pub fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: plain libc calls on a locally owned sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).at(|| "cannot create a pipe".into());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One line from `fd`, or None on EOF or after `timeout`.
pub fn read_line_within(fd: OwnedFd, timeout: Duration) -> Option<String> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: polls one descriptor we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    let mut line = String::new();
    BufReader::new(std::fs::File::from(fd))
        .read_line(&mut line)
        .ok()?;
    let line = line.trim_end().to_string();
    (!line.is_empty()).then_some(line)
}

/// The file devices hold one descriptor per inode the guest knows (a
/// `find` over a big tree knows tens of thousands): lift the limit as far as
/// this process may (root may raise the hard limit up to fs.nr_open).
pub fn raise_fd_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: nr_open.max(lim.rlim_max),
            rlim_max: nr_open.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit; big shared trees may fail with EMFILE"
                );
            }
        }
    }
}

/// Seconds since the epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
