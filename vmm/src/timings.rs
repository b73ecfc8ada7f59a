//! Boot-time marks: wall-clock and process CPU time from process start to each
//! milestone of a boot, recorded once each.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// The VMM starts building the VM: what came before was the session's
    /// own setup (policy, audit log, shares, egress).
    VmmStart,
    /// The VM exists and its memory is mapped and registered.
    MemoryReady,
    /// Legacy and virtio devices are wired.
    DevicesReady,
    /// The kernel, initramfs and boot parameters are in guest memory.
    KernelLoaded,
    /// Guest memory, kernel, boot parameters, devices and vCPUs are set up.
    VmConfigured,
    /// The first `KVM_RUN` of the boot vCPU is about to be issued.
    FirstVcpuEntry,
    /// The guest agent reported that it started (PID 1 is running).
    GuestAgentStart,
}

impl Mark {
    pub const ALL: [Mark; 7] = [
        Mark::VmmStart,
        Mark::MemoryReady,
        Mark::DevicesReady,
        Mark::KernelLoaded,
        Mark::VmConfigured,
        Mark::FirstVcpuEntry,
        Mark::GuestAgentStart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mark::VmmStart => "vmm_start",
            Mark::MemoryReady => "memory_ready",
            Mark::DevicesReady => "devices_ready",
            Mark::KernelLoaded => "kernel_loaded",
            Mark::VmConfigured => "vm_configured",
            Mark::FirstVcpuEntry => "first_vcpu_entry",
            Mark::GuestAgentStart => "guest_agent_start",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MarkTime {
    /// Microseconds of wall-clock time since process start.
    pub wall_us: u64,
    /// Microseconds of CPU time the whole VMM process had used by then.
    pub cpu_us: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TimingsReport {
    pub marks: Vec<(Mark, MarkTime)>,
}

impl TimingsReport {
    pub fn get(&self, mark: Mark) -> Option<MarkTime> {
        self.marks.iter().find(|(m, _)| *m == mark).map(|(_, t)| *t)
    }
}

pub struct BootTimings {
    start: Instant,
    marks: Mutex<Vec<(Mark, MarkTime)>>,
}

/// CPU time consumed by this process so far (all threads).
pub fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

impl BootTimings {
    /// `start` should be taken as early as possible in `main`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Mutex::new(Vec::with_capacity(Mark::ALL.len())),
        }
    }

    /// Records `mark` the first time only; later reports of the same mark
    /// (a guest that writes the port twice) are ignored.
    pub fn mark(&self, mark: Mark) {
        let t = MarkTime {
            wall_us: self.start.elapsed().as_micros() as u64,
            cpu_us: process_cpu_us(),
        };
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if !marks.iter().any(|(m, _)| *m == mark) {
            marks.push((mark, t));
        }
    }

    pub fn report(&self) -> TimingsReport {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        marks.sort_by_key(|(m, _)| Mark::ALL.iter().position(|x| x == m));
        TimingsReport { marks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_recorded_once_in_order() {
        let t = BootTimings::new(Instant::now());
        t.mark(Mark::GuestAgentStart);
        t.mark(Mark::VmConfigured);
        let first = t.report().get(Mark::VmConfigured).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.mark(Mark::VmConfigured);
        let r = t.report();
        assert_eq!(r.marks.len(), 2);
        assert_eq!(r.marks[0].0, Mark::VmConfigured);
        assert_eq!(r.get(Mark::VmConfigured), Some(first));
        assert!(r.get(Mark::FirstVcpuEntry).is_none());
    }
}
