//! The spawner: once it runs, every session thread is started by this one
//! thread, whose filter allows what any kind may (it runs none of their
//! code). A thread started by a confined thread would keep that thread's
//! filter under its own, so a device worker started from a vCPU (when the
//! guest activates the device) could call only what both allow.
//!
//! It is started separately from [`enable`](crate::enable) so that it can
//! start after the session's Landlock restriction, which threads also
//! inherit from the thread that starts them. Until then [`spawn`] starts
//! threads from the caller.

use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use crate::{Error, Kind};

type Body = Box<dyn FnOnce() + Send>;

struct Job {
    name: String,
    body: Body,
    started: SyncSender<std::io::Result<JoinHandle<()>>>,
}

static SPAWNER: OnceLock<Sender<Job>> = OnceLock::new();

/// Starts the spawner (once; nothing unless filters are enabled). The
/// threads it starts begin with every signal blocked but SIGSYS: signals
/// for the process go to the thread that waits for them (the VMM's event
/// loop), and a thread that wants one (a vCPU's kick) unblocks it.
pub fn start_spawner() -> Result<(), Error> {
    if !crate::enabled() || SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("seccomp-spawn".into())
        .spawn(move || {
            block_all_but_sigsys();
            if let Err(e) = crate::enter(Kind::Spawn) {
                tracing::error!("{e}");
                return;
            }
            for job in rx {
                let started = std::thread::Builder::new().name(job.name).spawn(job.body);
                let _ = job.started.send(started);
            }
        })
        .map_err(|source| Error::Thread {
            what: "spawn",
            source,
        })?;
    let _ = SPAWNER.set(tx);
    Ok(())
}

/// Starts a thread named `name` that confines itself to `kind` and runs
/// `f`. With filters enabled the spawner starts it (see the module), and a
/// thread whose filter cannot be installed ends without running `f`.
pub fn spawn(
    name: impl Into<String>,
    kind: Kind,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let name = name.into();
    let body: Body = Box::new(move || {
        if let Err(e) = crate::enter(kind) {
            tracing::error!("{e}; the thread does not start");
            return;
        }
        f();
    });
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let (started, wait) = sync_channel(1);
    let job = Job {
        name,
        body,
        started,
    };
    spawner
        .send(job)
        .map_err(|_| std::io::Error::other("the seccomp spawner thread has ended"))?;
    wait.recv()
        .map_err(|_| std::io::Error::other("the seccomp spawner thread has ended"))?
}

fn block_all_but_sigsys() {
    // SAFETY: plain libc calls on a local sigset_t; changes only this
    // thread's mask (and so its children's).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigdelset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}
