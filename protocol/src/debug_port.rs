//! The debug port: a VMM-trapped I/O port through which the guest agent reports
//! events that must reach the host before any device is up (boot marks, exit status).
//!
//! Each report is one 32-bit `out` to [`PORT`]: the top byte is the [`Report`] tag,
//! the low 24 bits its payload.

/// The I/O port. Chosen clear of the legacy PC ports a Linux guest probes.
pub const PORT: u16 = 0x04f0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The guest agent has started (PID 1 is running our code).
    AgentStarted,
    /// The guest's command ended with this exit status (0..=255).
    ExitStatus(u8),
}

const TAG_AGENT_STARTED: u32 = 1;
const TAG_EXIT_STATUS: u32 = 2;

impl Report {
    pub fn encode(self) -> u32 {
        match self {
            Report::AgentStarted => TAG_AGENT_STARTED << 24,
            Report::ExitStatus(code) => (TAG_EXIT_STATUS << 24) | u32::from(code),
        }
    }

    pub fn decode(value: u32) -> Option<Report> {
        match value >> 24 {
            TAG_AGENT_STARTED => Some(Report::AgentStarted),
            TAG_EXIT_STATUS if value & 0x00ff_ff00 == 0 => Some(Report::ExitStatus(value as u8)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for r in [
            Report::AgentStarted,
            Report::ExitStatus(0),
            Report::ExitStatus(255),
        ] {
            assert_eq!(Report::decode(r.encode()), Some(r));
        }
        assert_eq!(Report::decode(0), None);
        assert_eq!(Report::decode(0x0200_0100), None);
    }
}
