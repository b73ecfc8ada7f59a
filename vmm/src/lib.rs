//! sbx's virtual machine monitor: boots a Linux guest on KVM and owns every
//! channel between it and the host.

pub mod arch;
pub mod boot;
pub mod control;
pub mod devices;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod host;
pub mod machine;
pub mod pause;
pub mod timings;
pub mod vstate;

pub use control::ExitReason;
pub use machine::{run, Console, VmConfig, VmOutcome, VmmError};
pub use pause::{PauseError, PauseSwitch};
pub use timings::{BootTimings, Mark, TimingsReport};
