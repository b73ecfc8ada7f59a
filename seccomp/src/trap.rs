//! What happens when a thread calls outside its list: the kernel sends it
//! SIGSYS; the handler (on that thread, under its filter, so it uses only
//! `write` and `futex`, which every kind allows) writes the call and the
//! thread into a pipe and parks the thread for good. The reporter thread
//! reads the pipe, names the thread and the call, lets the session record
//! it, and ends the process.

use std::cell::Cell;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::{Error, Kind};

/// A call a thread was not allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The thread's name, as `/proc` shows it.
    pub thread: String,
    /// Its kind's name (`Kind::name`).
    pub kind: &'static str,
    /// The call's name (`syscall_N` for one the table does not know).
    pub syscall: String,
    pub number: i64,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the session's {} thread `{}` called {} (syscall {}), which its seccomp filter does not allow",
            self.kind, self.thread, self.syscall, self.number
        )
    }
}

/// The exit status the process ends with, as if SIGSYS had killed it.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The pipe's write end, for the handler (-1 until [`start`]).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
/// What parked threads wait on; it never changes.
static PARKED: AtomicI32 = AtomicI32::new(0);

thread_local! {
    // Const-initialised and without a destructor, so the handler can read
    // it without allocating.
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

pub(crate) fn set_kind(kind: Kind) {
    KIND.with(|k| k.set(kind.index()));
}

/// One report through the pipe: the call, the thread id, the kind.
const REPORT_LEN: usize = 16;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's SIGSYS fields (`_sigsys`): the call's address at offset 16,
    // the call's number, an int, at offset 24.
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler,
    // and for SIGSYS it carries `_sigsys`, whose `_syscall` is at offset 24.
    let number = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    let kind = KIND.with(Cell::get);
    let mut msg = [0u8; REPORT_LEN];
    msg[0..4].copy_from_slice(&number.to_ne_bytes());
    msg[4..8].copy_from_slice(&tid.to_ne_bytes());
    msg[8] = kind;
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // SAFETY: writes our own buffer to a pipe; a write this small is atomic.
    unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
    loop {
        // SAFETY: waits on a static word that never changes; the reporter
        // ends the process.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                PARKED.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0,
                std::ptr::null::<libc::timespec>(),
            )
        };
    }
}

/// Installs the handler and starts the reporter.
pub(crate) fn start(on_violation: impl FnOnce(&Violation) + Send + 'static) -> Result<(), Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Trap(std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors owned here; the write end lives as long
    // as the process (the handler may need it at any time).
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    REPORT_FD.store(fds[1], Ordering::Relaxed);

    // SAFETY: a zeroed sigaction is valid; the handler only writes to a
    // pipe and waits, both async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::Trap(std::io::Error::last_os_error()));
        }
    }
    std::thread::Builder::new()
        .name("seccomp-report".into())
        .spawn(move || report(read_end, on_violation))
        .map_err(|source| Error::Thread {
            what: "report",
            source,
        })?;
    Ok(())
}

fn report(read_end: OwnedFd, on_violation: impl FnOnce(&Violation)) {
    if let Err(e) = crate::enter(Kind::Report) {
        tracing::error!("{e}");
    }
    let mut pipe = std::fs::File::from(read_end);
    let mut msg = [0u8; REPORT_LEN];
    if pipe.read_exact(&mut msg).is_err() {
        return;
    }
    let number = i32::from_ne_bytes(msg[0..4].try_into().expect("4 bytes"));
    let tid = i32::from_ne_bytes(msg[4..8].try_into().expect("4 bytes"));
    let kind = Kind::ALL
        .get(usize::from(msg[8]))
        .map_or("unconfined", |k| k.name());
    let thread = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| format!("thread {tid}"));
    let violation = Violation {
        thread,
        kind,
        syscall: syscall_name(i64::from(number)),
        number: i64::from(number),
    };
    // Recording may wait on a lock the parked thread holds: the alarm
    // ends the process regardless.
    // SAFETY: alarm only arms this process's timer.
    unsafe { libc::alarm(5) };
    eprintln!("sbx: {violation}; the session is stopped");
    on_violation(&violation);
    // SAFETY: ends the process at once; the parked thread cannot go on.
    unsafe { libc::_exit(EXIT_STATUS) };
}

/// A call's name on x86_64.
pub fn syscall_name(number: i64) -> String {
    usize::try_from(number)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or_else(|| format!("syscall_{number}"), |s| s.name().to_string())
}

/// Unblocks `signal` in the calling thread. Threads the spawner starts
/// begin with every signal blocked but SIGSYS; one that wants a signal
/// (a vCPU's kick) takes it back with this.
pub fn unblock_signal(signal: libc::c_int) {
    // SAFETY: plain libc calls on a local sigset_t; changes only this
    // thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}
