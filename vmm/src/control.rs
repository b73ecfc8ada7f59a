//! State shared by the VMM's threads: why the VM is stopping, the guest's
//! reported exit status and the boot marks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::timings::BootTimings;

/// Why a VM stopped. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest agent reported its command's exit status: the normal end of a one-shot boot.
    AgentExited,
    /// The guest reset the machine (`reboot=k`): a normal end.
    GuestReset,
    /// The guest asked KVM to power off.
    GuestShutdown,
    /// A vCPU triple-faulted (or KVM reported a shutdown exit).
    TripleFault { vcpu: u8, registers: String },
    /// KVM could not emulate something or failed to enter the guest.
    KvmInternal {
        vcpu: u8,
        detail: String,
        registers: String,
    },
    /// The VMM itself failed while running the guest.
    VmmError { vcpu: Option<u8>, detail: String },
    /// The host asked us to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// The VM ran for as long as its configuration allows.
    LifetimeExpired(std::time::Duration),
}

impl ExitReason {
    /// True when the guest ended the VM on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::AgentExited | ExitReason::GuestReset | ExitReason::GuestShutdown
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::AgentExited => write!(f, "guest agent exited"),
            ExitReason::GuestReset => write!(f, "guest rebooted"),
            ExitReason::GuestShutdown => write!(f, "guest powered off"),
            ExitReason::TripleFault { vcpu, registers } => {
                write!(f, "vCPU {vcpu} triple-faulted; registers:\n{registers}")
            }
            ExitReason::KvmInternal {
                vcpu,
                detail,
                registers,
            } => write!(
                f,
                "KVM error on vCPU {vcpu}: {detail}; registers:\n{registers}"
            ),
            ExitReason::VmmError {
                vcpu: Some(v),
                detail,
            } => write!(f, "VMM error on vCPU {v}: {detail}"),
            ExitReason::VmmError { vcpu: None, detail } => write!(f, "VMM error: {detail}"),
            ExitReason::Signal(n) => write!(f, "stopped by signal {n}"),
            ExitReason::LifetimeExpired(d) => {
                write!(f, "stopped after its lifetime of {} s", d.as_secs())
            }
        }
    }
}

pub struct VmControl {
    stop: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    guest_status: Mutex<Option<u8>>,
    /// Written when a stop is requested, so the event loop wakes up.
    pub exit_evt: EventFd,
    pub timings: BootTimings,
}

impl VmControl {
    pub fn new(timings: BootTimings) -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            guest_status: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            timings,
        })
    }

    pub fn request_exit(&self, reason: ExitReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        // The eventfd counter cannot overflow from a handful of writes.
        let _ = self.exit_evt.write(1);
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_guest_status(&self, code: u8) {
        *self.guest_status.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
    }

    pub fn guest_status(&self) -> Option<u8> {
        *self.guest_status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The i8042 reset line ends the VM.
pub struct ResetTrigger(pub std::sync::Arc<VmControl>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(ExitReason::GuestReset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn first_reason_wins() {
        let c = VmControl::new(BootTimings::new(Instant::now())).unwrap();
        assert!(!c.should_stop());
        c.request_exit(ExitReason::GuestReset);
        c.request_exit(ExitReason::Signal(15));
        assert!(c.should_stop());
        assert_eq!(c.reason(), Some(ExitReason::GuestReset));
        assert_eq!(c.exit_evt.read().unwrap(), 2);
    }
}
