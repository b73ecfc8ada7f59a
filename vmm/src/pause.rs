//! Pausing a running VM: every vCPU parks outside KVM_RUN, so the guest
//! uses no host CPU, and its memory and devices stay as they are. Each
//! vCPU tells KVM it was paused (KVM_KVMCLOCK_CTRL), so the guest's
//! soft-lockup watchdog does not take the stop for a hang when it resumes.
//!
//! The caller makes a [`PauseSwitch`] and gives it to the VM in its
//! [`crate::VmConfig`]; `pause` returns once every vCPU has parked. The
//! event loop kicks the vCPUs out of KVM_RUN (it owns their threads).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("the VM's vCPUs did not stop within {0:?}")]
    Timeout(Duration),
}

#[derive(Default)]
struct State {
    want_paused: bool,
    /// vCPUs the VM runs, once they have started; parked ones.
    vcpus: usize,
    parked: usize,
    running: bool,
}

pub struct PauseSwitch {
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the event loop to kick the vCPUs.
    pub(crate) wake: EventFd,
}

impl std::fmt::Debug for PauseSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseSwitch")
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl PauseSwitch {
    pub fn new() -> std::io::Result<PauseSwitch> {
        Ok(PauseSwitch {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every vCPU and returns once all have parked. Pausing a paused
    /// VM does nothing.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let mut s = self.lock();
        if !s.running {
            return Err(PauseError::NotRunning);
        }
        s.want_paused = true;
        let _ = self.wake.write(1);
        let deadline = Instant::now() + timeout;
        while s.running && s.parked < s.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.want_paused = false;
                self.changed.notify_all();
                return Err(PauseError::Timeout(timeout));
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if s.running {
            Ok(())
        } else {
            Err(PauseError::NotRunning)
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.lock().want_paused = false;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        let s = self.lock();
        s.want_paused && s.parked == s.vcpus
    }

    /// The VM started `vcpus` vCPUs.
    pub(crate) fn started(&self, vcpus: usize) {
        let mut s = self.lock();
        s.vcpus = vcpus;
        s.running = true;
    }

    /// The VM is stopping: parked vCPUs return, and no pause waits.
    pub(crate) fn stopping(&self) {
        let mut s = self.lock();
        s.running = false;
        s.want_paused = false;
        self.changed.notify_all();
    }

    pub(crate) fn wants_pause(&self) -> bool {
        self.lock().want_paused
    }

    pub(crate) fn all_parked(&self) -> bool {
        let s = self.lock();
        !s.running || s.parked >= s.vcpus
    }

    /// Called by a vCPU between KVM_RUNs: parks it while a pause is
    /// wanted. `paused` runs once as it parks (to tell KVM).
    pub(crate) fn park(&self, paused: impl FnOnce()) {
        let mut s = self.lock();
        if !s.want_paused {
            return;
        }
        paused();
        s.parked += 1;
        self.changed.notify_all();
        while s.want_paused && s.running {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let p = Arc::new(PauseSwitch::new().unwrap());
        assert!(matches!(
            p.pause(Duration::from_millis(10)),
            Err(PauseError::NotRunning)
        ));
        p.started(2);
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (p, runs) = (p.clone(), runs.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        p.park(|| {});
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        p.pause(Duration::from_secs(5)).unwrap();
        assert!(p.is_paused());
        let at = runs.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            runs.load(std::sync::atomic::Ordering::SeqCst),
            at,
            "a parked vCPU ran"
        );
        p.resume();
        assert!(!p.is_paused());
        std::thread::sleep(Duration::from_millis(50));
        assert!(runs.load(std::sync::atomic::Ordering::SeqCst) > at);
        // A stop releases parked vCPUs too.
        p.pause(Duration::from_secs(5)).unwrap();
        p.stopping();
        for t in threads {
            t.join().unwrap();
        }
    }
}
