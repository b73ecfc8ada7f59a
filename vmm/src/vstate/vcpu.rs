//! vCPUs: initial state, and the run loop that services the guest's exits.
//! The guest is hostile: every exit it can cause is handled without panicking,
//! and anything unexpected ends the VM with a reason rather than the VMM.

use std::sync::Arc;

use kvm_bindings::{
    kvm_xcrs, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};

use super::memory::GuestMemory;
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, lapic, msr, regs};
use crate::control::{ExitReason, VmControl};
use crate::devices::bus::Buses;
use crate::pause::PauseSwitch;
use crate::timings::Mark;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM refused to {what} for vCPU {index}: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Regs { index: u8, source: regs::RegsError },
    #[error("vCPU {index}: {source}")]
    Msrs { index: u8, source: msr::MsrError },
}

/// KVM's supported CPUID, fetched once per VM and then normalised per vCPU.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    // KVM emulates the TSC-deadline timer whenever it has the capability but
    // leaves it out of the supported CPUID; without it the guest kernel
    // calibrates its local APIC timer at boot (about 200 ms).
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        cpuid::advertise_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "create the vCPU",
                source,
            })?;
        Ok(Vcpu { index, fd })
    }

    /// Sets CPUID, MSRs, XCR0, LAPIC and, for the boot vCPU, the registers that
    /// enter the kernel at `entry`. Other vCPUs wait for the guest's INIT/SIPI.
    pub fn configure(
        &self,
        kvm: &Kvm,
        mem: &GuestMemory,
        base_cpuid: &CpuId,
        count: u8,
        entry: u64,
        zero_page: u64,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm_err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(&mut cpuid, index, count);
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        msr::setup_msrs(kvm, &self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        self.setup_xcr0(kvm, &cpuid);
        lapic::setup_lint(&self.fd).map_err(kvm_err("set up the local APIC"))?;
        let regs_err = |source| VcpuError::Regs { index, source };
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        if index == 0 {
            regs::setup_regs(&self.fd, entry, zero_page).map_err(regs_err)?;
            regs::setup_sregs(mem, &self.fd).map_err(regs_err)?;
        }
        Ok(())
    }

    /// Enables every XSAVE component the guest's CPUID advertises, as the
    /// kernel would. Where XSETBV is not intercepted (nested TCG hosts) this is
    /// what lets the guest use AVX state at all. Best effort: the guest kernel
    /// still sets XCR0 itself on real hardware.
    fn setup_xcr0(&self, kvm: &Kvm, cpuid: &CpuId) {
        if !kvm.check_extension(Cap::Xcrs) {
            return;
        }
        let Some(mask) = cpuid::supported_xcr0(cpuid) else {
            return;
        };
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = mask;
        if let Err(e) = self.fd.set_xcrs(&xcrs) {
            tracing::debug!(vcpu = self.index, error = %e, xcr0 = mask, "KVM_SET_XCRS refused");
        }
    }

    /// Runs the vCPU until the VM is asked to stop. Exits that end the VM are
    /// reported through `control`; this function never panics on guest input.
    pub fn run(mut self, bus: Arc<Buses>, control: Arc<VmControl>, pause: Arc<PauseSwitch>) {
        let _guard = StopOnPanic {
            control: control.clone(),
            index: self.index,
        };
        let mut first = self.index == 0;
        while !control.should_stop() {
            // Between KVM_RUNs (a kick ends one): park while paused, having
            // told KVM, so the guest does not count the stop as a hang.
            pause.park(|| {
                if let Err(e) = self.fd.kvmclock_ctrl() {
                    tracing::debug!(vcpu = self.index, error = %e, "KVM_KVMCLOCK_CTRL refused");
                }
            });
            if control.should_stop() {
                break;
            }
            if first {
                control.timings.mark(Mark::FirstVcpuEntry);
                first = false;
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    control.request_exit(ExitReason::VmmError {
                        vcpu: Some(self.index),
                        detail: format!("KVM_RUN failed: {e}"),
                    });
                    break;
                }
            };
            let stop = match exit {
                VcpuExit::IoOut(port, data) => {
                    bus.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    bus.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    bus.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    bus.mmio.write(addr, data);
                    None
                }
                VcpuExit::SystemEvent(kind, _) => Some(match kind {
                    KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestShutdown,
                    KVM_SYSTEM_EVENT_CRASH => self.internal("guest crash event"),
                    other => self.internal(&format!("unknown system event {other}")),
                }),
                VcpuExit::Shutdown => Some(ExitReason::TripleFault {
                    vcpu: self.index,
                    registers: dump_registers(&self.fd),
                }),
                // With the in-kernel LAPIC, HLT is handled by KVM; a HLT exit
                // means the guest stopped for good.
                VcpuExit::Hlt => Some(ExitReason::GuestShutdown),
                VcpuExit::FailEntry(reason, cpu) => Some(self.internal(&format!(
                    "VM entry failed (hardware reason {reason:#x}, host CPU {cpu})"
                ))),
                VcpuExit::InternalError => {
                    Some(self.internal("KVM internal error (emulation failure)"))
                }
                other => {
                    let detail = format!("unexpected exit {other:?}");
                    Some(self.internal(&detail))
                }
            };
            if let Some(reason) = stop {
                control.request_exit(reason);
            }
        }
    }

    fn internal(&self, detail: &str) -> ExitReason {
        ExitReason::KvmInternal {
            vcpu: self.index,
            detail: detail.to_string(),
            registers: dump_registers(&self.fd),
        }
    }
}

/// A panicking vCPU thread must still stop the VM, or the others would run on.
struct StopOnPanic {
    control: Arc<VmControl>,
    index: u8,
}

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control.request_exit(ExitReason::VmmError {
                vcpu: Some(self.index),
                detail: "vCPU thread panicked".into(),
            });
        }
    }
}

/// The vCPU's registers, for error reports.
pub fn dump_registers(fd: &VcpuFd) -> String {
    let mut out = String::new();
    match fd.get_regs() {
        Ok(r) => out.push_str(&format!(
            "  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )),
        Err(e) => out.push_str(&format!("  (general registers unavailable: {e})\n")),
    }
    match fd.get_sregs() {
        Ok(s) => out.push_str(&format!(
            "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        )),
        Err(e) => out.push_str(&format!("  (special registers unavailable: {e})")),
    }
    out
}
