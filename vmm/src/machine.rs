//! One microVM from configuration to exit: builds the VM (memory, kernel,
//! devices, vCPUs), runs one thread per vCPU plus this event thread, and
//! tears everything down on guest exit, host signal or error.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};
use crate::arch::x86_64::mptable;
use crate::boot::{self, BootError};
use crate::control::{ExitReason, ResetTrigger, VmControl};
use crate::devices::bus::{Bus, Buses};
use crate::devices::legacy::debug_port::{self, DebugPort};
use crate::devices::legacy::i8042::{ResetLine, I8042_BASE, I8042_LEN};
use crate::devices::legacy::serial::{SerialConsole, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::fs::{Fs, FsConfig, FsError};
use crate::devices::virtio::mmio::{self, MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::host::{self, HostError};
use crate::pause::PauseSwitch;
use crate::timings::{BootTimings, Mark, TimingsReport};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// The guest's console: where its serial output goes and, optionally, a file
/// descriptor whose bytes are typed into it.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    pub input: Option<RawFd>,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kvm_path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Stop the VM after this long (a policy's session lifetime).
    pub lifetime: Option<std::time::Duration>,
    /// The guest's vsock device, if it gets one.
    pub vsock: Option<VsockConfig>,
    /// One virtio-fs device per shared directory.
    pub fs: Vec<FsConfig>,
    /// One virtio-blk device per disk image (the guest tells them apart by serial).
    pub block: Vec<BlockConfig>,
    /// Pauses and resumes the running VM, for whoever holds it too.
    pub pause: Option<Arc<PauseSwitch>>,
}

/// The smallest memory a guest may be given; the kernel check gives a precise figure.
pub const MIN_MEM_MIB: u64 = 16;
/// Above this the guest's RAM would not fit the host's address space sensibly.
pub const MAX_MEM_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{requested} vCPUs is out of range: this host allows 1 to {max}")]
    VcpuCount { requested: u32, max: u32 },
    #[error("guest memory of {0} MiB is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB} MiB)")]
    MemRange(u64),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("cannot start vCPU thread {index}: {source}")]
    Thread { index: u8, source: std::io::Error },
    #[error(transparent)]
    Seccomp(#[from] sbx_seccomp::Error),
}

fn setup_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |source| VmmError::Setup { what, source }
}

/// How the VM ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    pub reason: ExitReason,
    /// The exit status the guest agent reported, if it reported one.
    pub guest_status: Option<u8>,
    /// Guest memory resident on the host when the VM stopped.
    pub guest_resident_bytes: u64,
    pub timings: TimingsReport,
}

/// Validates `vcpus` against this host's KVM and the MP table.
pub fn check_vcpus(requested: u32, kvm_max: usize) -> Result<u8, VmmError> {
    let max = kvm_max.min(usize::from(mptable::MAX_VCPUS)) as u32;
    if requested == 0 || requested > max {
        return Err(VmmError::VcpuCount { requested, max });
    }
    Ok(requested as u8)
}

pub fn check_mem(mib: u64) -> Result<(), VmmError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(VmmError::MemRange(mib));
    }
    Ok(())
}

/// Boots `config` and runs it to completion.
pub fn run(
    config: &VmConfig,
    console: Console,
    timings: BootTimings,
) -> Result<VmOutcome, VmmError> {
    timings.mark(Mark::VmmStart);
    check_mem(config.mem_mib)?;
    host::ensure_bootable(&config.kvm_path)?;
    let vm = Vm::new(&config.kvm_path)?;
    let vcpu_count = check_vcpus(config.vcpus, vm.max_vcpus())?;

    let mem = memory::create(config.mem_mib)?;
    vm.register_memory(&mem)?;
    timings.mark(Mark::MemoryReady);
    let control = Arc::new(VmControl::new(timings).map_err(setup_err("the exit event"))?);
    let (pio, serial) = build_legacy_devices(&vm, &control, console.output)?;
    let mut virtio = VirtioDevices::default();
    if let Some(vsock) = &config.vsock {
        let dev = Vsock::new(vsock.clone()).map_err(setup_err("the vsock device"))?;
        virtio.add(&vm, &mem, Box::new(dev))?;
    }
    for fs in &config.fs {
        virtio.add(&vm, &mem, Box::new(Fs::new(fs)?))?;
    }
    for disk in &config.block {
        virtio.add(&vm, &mem, Box::new(Block::new(disk)?))?;
    }
    // Every VM gets the host's randomness for its kernel's pool.
    virtio.add(&vm, &mem, Box::new(Rng::new()))?;
    control.timings.mark(Mark::DevicesReady);
    let cmdline = virtio.cmdline(&config.cmdline);
    let entry = boot::load(
        &mem,
        config.mem_mib,
        &config.kernel,
        config.initrd.as_deref(),
        &cmdline,
        vcpu_count,
    )?;
    control.timings.mark(Mark::KernelLoaded);
    let bus = Arc::new(Buses {
        pio,
        mmio: std::mem::take(&mut virtio.bus),
    });

    let base_cpuid = vcpu::supported_cpuid(&vm.kvm).map_err(kvm_setup_err("CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let v = Vcpu::new(&vm, index)?;
        v.configure(
            &vm.kvm,
            &mem,
            &base_cpuid,
            vcpu_count,
            entry.entry,
            entry.zero_page,
        )?;
        vcpus.push(v);
    }
    control.timings.mark(Mark::VmConfigured);

    let pause = match &config.pause {
        Some(p) => p.clone(),
        None => Arc::new(PauseSwitch::new().map_err(setup_err("the pause switch"))?),
    };
    let signals = HostSignals::block().map_err(setup_err("signal handling"))?;
    // Set up: from here this thread only waits and takes the VM down.
    sbx_seccomp::enter(sbx_seccomp::Kind::EventLoop)?;
    let threads = spawn_vcpus(vcpus, &bus, &control, &pause);
    let loop_result = match &threads {
        Ok(started) => {
            pause.started(started.len());
            let events = Events {
                control: &control,
                signals: &signals,
                pause: &pause,
                vcpus: started,
            };
            event_loop(&events, &serial, console.input, config.lifetime)
        }
        Err(_) => Ok(()),
    };
    // Teardown happens on every path: stop and join whatever was started
    // (parked vCPUs first return to their loop, which sees the stop).
    control.request_exit(ExitReason::VmmError {
        vcpu: None,
        detail: "event loop ended".into(),
    });
    pause.stopping();
    let threads = match threads {
        Ok(t) => t,
        Err((started, e)) => {
            stop_vcpus(started);
            return Err(e);
        }
    };
    stop_vcpus(threads);
    virtio.shutdown();
    drop(signals);
    if let Ok(mut s) = serial.lock() {
        s.flush();
    }
    loop_result.map_err(setup_err("the event loop"))?;

    Ok(VmOutcome {
        reason: control.reason().unwrap_or(ExitReason::GuestReset),
        guest_status: control.guest_status(),
        guest_resident_bytes: memory::resident_bytes(&mem),
        timings: control.timings.report(),
    })
}

/// For errno-style errors (KVM ioctls, vmm-sys-util calls).
fn kvm_setup_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Setup {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The VM's virtio-mmio devices, each with its window, GSI and queue kicks.
#[derive(Default)]
struct VirtioDevices {
    bus: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: Vec<String>,
}

impl VirtioDevices {
    fn add(
        &mut self,
        vm: &Vm,
        mem: &memory::GuestMemory,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        let index = self.transports.len() as u32;
        let base = VIRTIO_MMIO_BASE + u64::from(index) * MMIO_LEN;
        let gsi = VIRTIO_IRQ_BASE + index;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("a virtio interrupt"))?;
        vm.fd
            .register_irqfd(&irq, gsi)
            .map_err(kvm_setup_err("a virtio interrupt"))?;
        let mut kicks = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let kick =
                EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("a virtio queue notifier"))?;
            vm.fd
                .register_ioevent(
                    &kick,
                    &kvm_ioctls::IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_setup_err("a virtio queue notifier"))?;
            kicks.push(kick);
        }
        let transport =
            MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irq)), kicks).shared();
        self.bus
            .insert(base, MMIO_LEN, transport.clone())
            .map_err(|e| VmmError::Setup {
                what: "the MMIO bus",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.transports.push(transport);
        self.cmdline.push(mmio::cmdline_entry(base, gsi));
        Ok(())
    }

    /// The guest command line with the devices declared before any `--`
    /// (after it, words belong to the guest's command).
    fn cmdline(&self, base: &str) -> String {
        if self.cmdline.is_empty() {
            return base.to_string();
        }
        let devices = self.cmdline.join(" ");
        match base.find(" -- ") {
            Some(at) => format!("{} {devices}{}", &base[..at], &base[at..]),
            None => format!("{} {devices}", base.trim_end()),
        }
    }

    fn shutdown(&self) {
        for t in &self.transports {
            if let Ok(mut t) = t.lock() {
                t.shutdown();
            }
        }
    }
}

fn build_legacy_devices(
    vm: &Vm,
    control: &Arc<VmControl>,
    output: Box<dyn Write + Send>,
) -> Result<(Bus, Arc<Mutex<SerialConsole>>), VmmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("the serial interrupt"))?;
    vm.fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_setup_err("the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(EventFdTrigger(irq), output)));
    let mut bus = Bus::default();
    let overlap = |e: crate::devices::bus::OverlapError| VmmError::Setup {
        what: "the port I/O bus",
        source: std::io::Error::other(e.to_string()),
    };
    bus.insert(COM1_BASE.into(), COM1_LEN.into(), serial.clone())
        .map_err(overlap)?;
    bus.insert(
        I8042_BASE.into(),
        I8042_LEN.into(),
        Arc::new(Mutex::new(ResetLine::new(ResetTrigger(control.clone())))),
    )
    .map_err(overlap)?;
    bus.insert(
        sbx_protocol::debug_port::PORT.into(),
        debug_port::LEN.into(),
        Arc::new(Mutex::new(DebugPort::new(control.clone()))),
    )
    .map_err(overlap)?;
    Ok((bus, serial))
}

type StartedVcpus = Vec<JoinHandle<()>>;

fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    bus: &Arc<Buses>,
    control: &Arc<VmControl>,
    pause: &Arc<PauseSwitch>,
) -> Result<StartedVcpus, (StartedVcpus, VmmError)> {
    // A no-op handler: the signal only needs to interrupt KVM_RUN with EINTR.
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    if let Err(e) = register_signal_handler(SIGRTMIN(), kick) {
        return Err((Vec::new(), kvm_setup_err("the vCPU kick signal")(e)));
    }
    let mut started = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let index = v.index;
        let (bus, control, pause) = (bus.clone(), control.clone(), pause.clone());
        let run = move || {
            // Threads may start with signals blocked (see sbx_seccomp):
            // the kick must get through.
            sbx_seccomp::unblock_signal(SIGRTMIN());
            v.run(bus, control, pause)
        };
        match sbx_seccomp::spawn(format!("sbx-vcpu-{index}"), sbx_seccomp::Kind::Vcpu, run) {
            Ok(h) => started.push(h),
            Err(source) => return Err((started, VmmError::Thread { index, source })),
        }
    }
    Ok(started)
}

/// Interrupts one vCPU's KVM_RUN (the handler does nothing; KVM_RUN
/// returns EINTR and the vCPU looks at what it was asked).
fn kick_vcpu(t: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    if !t.is_finished() {
        // SAFETY: the pthread is alive until joined, which only its owner
        // does, after the kicks.
        unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
    }
}

/// Interrupts every vCPU thread until it notices the stop flag, then joins it.
fn stop_vcpus(threads: StartedVcpus) {
    let mut pending = threads;
    while !pending.is_empty() {
        pending.iter().for_each(kick_vcpu);
        std::thread::sleep(Duration::from_micros(500));
        let (done, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        pending = rest;
    }
}

/// SIGINT, SIGTERM and SIGHUP are blocked while the VM runs (vCPU threads
/// inherit the mask) and read from a signalfd by the event loop instead.
struct HostSignals {
    fd: std::os::fd::OwnedFd,
    old_mask: libc::sigset_t,
}

impl HostSignals {
    fn block() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain libc calls on locally owned sigset_t values.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask);
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
                return Err(e);
            }
            Ok(Self {
                fd: std::os::fd::OwnedFd::from_raw_fd(fd),
                old_mask,
            })
        }
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: reads one signalfd_siginfo into a correctly sized buffer.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            (n as usize == std::mem::size_of::<libc::signalfd_siginfo>())
                .then_some(info.ssi_signo as i32)
        }
    }
}

impl Drop for HostSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

const EV_EXIT: u64 = 0;
const EV_SIGNAL: u64 = 1;
const EV_INPUT: u64 = 2;
const EV_PAUSE: u64 = 3;
/// How long the event loop keeps kicking vCPUs into a pause.
const PAUSE_KICKING: Duration = Duration::from_secs(2);

/// What the event loop waits on and acts upon.
struct Events<'a> {
    control: &'a VmControl,
    signals: &'a HostSignals,
    pause: &'a PauseSwitch,
    vcpus: &'a StartedVcpus,
}

impl Events<'_> {
    /// Kicks the vCPUs out of KVM_RUN until all have parked: one may be
    /// on its way into KVM_RUN when the first kick lands.
    fn kick_into_pause(&self) {
        let _ = self.pause.wake.read();
        let until = std::time::Instant::now() + PAUSE_KICKING;
        while self.pause.wants_pause()
            && !self.pause.all_parked()
            && !self.control.should_stop()
            && std::time::Instant::now() < until
        {
            self.vcpus.iter().for_each(kick_vcpu);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn event_loop(
    vm: &Events<'_>,
    serial: &Mutex<SerialConsole>,
    input: Option<RawFd>,
    lifetime: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let (control, signals) = (vm.control, vm.signals);
    let deadline = lifetime.map(|d| (d, std::time::Instant::now() + d));
    let epoll = Epoll::new()?;
    let add = |fd: RawFd, data: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, data),
        )
    };
    add(control.exit_evt.as_raw_fd(), EV_EXIT)?;
    add(signals.fd.as_raw_fd(), EV_SIGNAL)?;
    add(vm.pause.wake.as_raw_fd(), EV_PAUSE)?;
    if let Some(fd) = input {
        add(fd, EV_INPUT)?;
    }
    // Console input read but not yet taken by the guest's UART. While some is
    // waiting, stdin is not watched (it would stay readable and spin the loop)
    // and the loop polls the UART instead.
    let mut pending: Vec<u8> = Vec::new();
    let mut input_open = input.is_some();
    let mut events = vec![EpollEvent::default(); 4];
    while !control.should_stop() {
        let mut timeout = if pending.is_empty() { -1 } else { 5 };
        if let Some((limit, at)) = deadline {
            let left = at.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                control.request_exit(ExitReason::LifetimeExpired(limit));
                continue;
            }
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            timeout = if timeout < 0 { ms } else { timeout.min(ms) };
        }
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match (ev.data(), input) {
                (EV_SIGNAL, _) => {
                    if let Some(signo) = signals.read() {
                        control.request_exit(ExitReason::Signal(signo));
                    }
                }
                (EV_PAUSE, _) => vm.kick_into_pause(),
                (EV_INPUT, Some(fd)) => {
                    let mut buf = [0u8; 256];
                    // SAFETY: reads into a stack buffer of the given length.
                    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if r <= 0 {
                        // EOF or error: stop listening, keep the VM running.
                        input_open = false;
                    } else {
                        pending.extend_from_slice(&buf[..r as usize]);
                    }
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                _ => {}
            }
        }
        if !pending.is_empty() {
            if let Ok(mut s) = serial.lock() {
                let taken = s.enqueue_input(&pending);
                pending.drain(..taken);
            }
            if let (true, true, Some(fd)) = (pending.is_empty(), input_open, input) {
                add(fd, EV_INPUT)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_and_memory_ranges() {
        assert!(check_vcpus(0, 288).is_err());
        assert_eq!(check_vcpus(4, 288).unwrap(), 4);
        let e = check_vcpus(300, 288).unwrap_err().to_string();
        assert!(e.contains("1 to 254"), "{e}");
        assert!(check_vcpus(5, 4).is_err());
        assert!(check_mem(0).is_err());
        assert!(check_mem(8).is_err());
        assert!(check_mem(256).is_ok());
    }
}
