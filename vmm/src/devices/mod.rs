//! Devices the guest sees: legacy PC devices on port I/O and virtio devices on MMIO.

pub mod bus;
pub mod legacy;
pub mod virtio;
