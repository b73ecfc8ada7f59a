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

/// How many descriptors a session may hold: as many as the kernel lets a
/// process (`fs.nr_open`), at most 1,048,576, and at most an eighth of the
/// host's system-wide file table (`fs.file-max`), so that a guest opening
/// files in its shares without end cannot empty that table for every other
/// host process (it then gets EMFILE, its own problem).
fn fd_allowance(nr_open: u64, file_max: u64) -> u64 {
    nr_open.min(1 << 20).min(file_max / 8).max(1024)
}

fn read_proc(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The file devices hold one descriptor per inode the guest knows (a
/// `find` over a big tree knows tens of thousands): set the soft limit to
/// [`fd_allowance`], raising the hard limit to it if this process may.
pub fn set_fd_limit() {
    let nr_open = read_proc("/proc/sys/fs/nr_open").unwrap_or(1 << 20);
    let file_max = read_proc("/proc/sys/fs/file-max").unwrap_or(u64::MAX);
    let want = fd_allowance(nr_open, file_max) as libc::rlim_t;
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
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = want.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "cannot set the open-file limit; big shared trees may fail with EMFILE"
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

#[cfg(test)]
mod tests {
    use super::fd_allowance;

    #[test]
    fn a_session_takes_an_eighth_of_the_file_table_at_most() {
        // This machine's numbers: 24 GiB, file-max 2,466,165.
        assert_eq!(fd_allowance(1 << 20, 2_466_165), 308_270);
        // A big host: the process limit decides.
        assert_eq!(fd_allowance(1 << 20, u64::MAX), 1 << 20);
        assert_eq!(fd_allowance(65_536, u64::MAX), 65_536);
        // A tiny one still leaves a session room to work.
        assert_eq!(fd_allowance(1 << 20, 4_000), 1024);
    }
}
