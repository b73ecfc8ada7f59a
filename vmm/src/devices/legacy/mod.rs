//! Legacy PC devices: the 8250 serial console, the i8042 reset line and sbx's debug port.

pub mod debug_port;
pub mod i8042;
pub mod serial;

/// Interrupt trigger backed by an eventfd registered with KVM as an irqfd.
pub struct EventFdTrigger(pub vmm_sys_util::eventfd::EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
