//! The host/guest protocol shared by the VMM and the guest agent.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cmdline;
pub mod debug_port;
pub mod egress;
pub mod mcp;
