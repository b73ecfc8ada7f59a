//! Devices the guest reaches through trapped port I/O.

pub mod bus;
pub mod legacy;
