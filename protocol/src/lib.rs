//! The host/guest protocol shared by the VMM and the guest agent.

pub mod agent;
pub mod debug_port;
pub mod egress;
