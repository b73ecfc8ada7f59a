//! sbx's egress proxy. The guest has no network device: every connection it
//! makes arrives here (over vsock, from the guest agent's loopback relay) as
//! an HTTP proxy request. Each one is checked against the policy at the name
//! and again at the address the host resolved, connected to exactly that
//! address, and audited. TLS to hosts that need it (secrets to inject,
//! request rules) is terminated with a per-session CA so the real secret is
//! only ever added here, on the host.

#![forbid(unsafe_code)]

mod body;
mod gate;
pub mod head;
mod http;
pub mod mitm;
mod proxy;
pub mod secrets;
pub mod sni;
pub mod stream;

pub use gate::{Limits, Recorder};
pub use proxy::{Options, Proxy, ProxyError, Resolver, TLS_PORTS};
pub use stream::Stream;
