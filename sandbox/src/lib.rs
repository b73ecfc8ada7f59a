//! sbx sessions: the one place a sandbox is assembled. A [`SessionSpec`]
//! says what a session is; [`session::run`] assembles it in the order data
//! flows (the host and images, the policy, the audit log, the shares,
//! egress, the VM's configuration, the VM); [`launch`] starts and stops
//! session processes; [`attach`] runs a command in a running session.
//!
//! The `sbx` binary, the template builder and the coming control plane
//! drive sessions through this crate, not through the CLI; the MCP
//! gateway (`sbx-mcp`) runs inside a session, wired in by [`mcp`].

pub mod attach;
pub mod cgroup;
pub mod confine;
mod control;
pub mod disks;
mod egress;
mod error;
mod files;
mod guest;
mod host_edits;
pub mod launch;
pub mod managed;
pub mod mcp;
pub mod memory;
pub mod paths;
pub mod privileges;
pub mod seccomp;
pub mod secrets;
pub mod session;
pub mod spec;
pub mod state;
pub mod sys;
pub mod terminal;
mod throttle;
pub mod workspace;

pub use error::{Error, Result};
pub use sbx_policy::Selection;
pub use spec::{EgressSpec, MountSpec, Pin, PolicySpec, RootSpec, SessionSpec, VmSpec, WORKSPACE};

/// Exit status for failures of sbx itself (as opposed to the guest
/// command's own status), following `docker run`'s convention.
pub const EXIT_SBX_ERROR: u8 = 125;
