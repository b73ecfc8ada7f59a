//! Receives the guest agent's debug-port reports (see `sbx_protocol::debug_port`).

use std::sync::Arc;

use sbx_protocol::debug_port::Report;

use crate::control::{ExitReason, VmControl};
use crate::devices::bus::BusDevice;
use crate::timings::Mark;

pub const LEN: u16 = 4;

pub struct DebugPort {
    control: Arc<VmControl>,
}

impl DebugPort {
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset != 0 {
            return;
        }
        match Report::decode(u32::from_le_bytes(bytes)) {
            Some(Report::AgentStarted) => self.control.timings.mark(Mark::GuestAgentStart),
            Some(Report::ExitStatus(code)) => {
                // The agent has synced its filesystems before reporting; nothing
                // the guest does after this matters, so end the VM now.
                self.control.set_guest_status(code);
                self.control.request_exit(ExitReason::AgentExited);
            }
            None => tracing::debug!(value = ?bytes, "unknown debug port report ignored"),
        }
    }
}
