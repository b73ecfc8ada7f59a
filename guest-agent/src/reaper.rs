//! PID 1 reaps every process. Exit statuses of processes the agent started
//! go to whoever waits for them; orphans are just reaped.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};

type Waiters = Mutex<HashMap<libc::pid_t, Sender<libc::c_int>>>;

/// Signalled on every spawn, so that a reaper with no children can sleep.
fn spawned() -> &'static Condvar {
    static C: OnceLock<Condvar> = OnceLock::new();
    C.get_or_init(Condvar::new)
}

fn waiters() -> &'static Waiters {
    static W: OnceLock<Waiters> = OnceLock::new();
    W.get_or_init(Waiters::default)
}

/// Spawns a process with `spawn` and returns its pid and a receiver for its
/// wait status. The lock is held across the spawn so that the reaper cannot
/// see the exit before the waiter is registered.
pub fn spawn_watched<T>(
    spawn: impl FnOnce() -> std::io::Result<(libc::pid_t, T)>,
) -> std::io::Result<(libc::pid_t, T, Receiver<libc::c_int>)> {
    let mut w = waiters().lock().unwrap_or_else(|e| e.into_inner());
    let (pid, extra) = spawn()?;
    let (tx, rx) = channel();
    w.insert(pid, tx);
    spawned().notify_all();
    Ok((pid, extra, rx))
}

/// Reaps children for ever (run on its own thread).
pub fn run() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // No children: sleep until the next spawn (checked under the
                // lock, so a spawn cannot slip in between).
                let w = waiters().lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: a non-blocking probe that fails with ECHILD when
                // there is no child at all; it reaps nothing (WNOWAIT).
                let any = unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(
                        libc::P_ALL,
                        0,
                        &mut info,
                        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                    )
                };
                if any < 0 {
                    let _w = spawned().wait(w);
                }
            }
            continue;
        }
        let mut w = waiters().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = w.remove(&pid) {
            let _ = tx.send(status);
        }
    }
}
