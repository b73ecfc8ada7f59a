//! sbx's MCP gateway (`sbx-mcp`): one host-side chokepoint for every tool
//! call an agent makes. The guest reaches it only over vsock; every server
//! it aggregates is either a stdio command in a microVM of its own (started
//! through a [`Launcher`] the sandbox provides) or a remote Streamable HTTP
//! server reached from the host with credentials the agent never sees.
//!
//! - `config.rs`: the `[[mcp.server]]` declarations, with file:line errors;
//! - `gateway.rs`: the aggregation and every check (policy, rate, pins,
//!   scanning) with its audit records;
//! - `upstream.rs`: connections to servers, restarted after a crash;
//! - `pins.rs`: tool pinning; `scan.rs`: secret and credential scanning;
//! - `serve.rs`: Streamable HTTP towards the agent, and `sbx mcp`'s requests.

pub mod config;
mod error;
pub mod gateway;
pub mod names;
pub mod pins;
pub mod scan;
pub mod serve;
mod upstream;

pub use config::{OnCredential, ServerSpec, StdioServer, Transport};
pub use error::{McpError, Result};
pub use gateway::{Gateway, Options};
pub use pins::Pins;
pub use serve::Server;
pub use upstream::{Launcher, Pipes};
