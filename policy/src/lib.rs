//! sbx's policy engine. One model for every surface that crosses the VM
//! boundary (files, network, credentials, MCP tools, exec, limits), loaded
//! from layered TOML files (org, then team, then project, then a built-in
//! preset). Allows combine; an enforced deny always wins, so no layer can
//! loosen another's deny; whatever no rule allows is denied. Every decision
//! names the rule, its layer and its file and line.

#![forbid(unsafe_code)]

mod bundle;
mod compile;
mod credential;
mod delegate;
mod discovery;
mod error;
mod exec;
mod explain;
mod format;
mod fs;
mod host;
mod http;
mod limits;
mod mcp;
mod net;
mod policy;
mod preset;
mod rule;
mod source;

pub use bundle::{
    decode_public_key, decode_secret_key, encode_public_key, encode_secret_key, generate_key,
    is_bundle, key_id, open as bundle_open, sign, sign_until, KeyError, UNTIL_HEADER_LINES,
};
pub use credential::{CredentialGrant, Injection};
pub use delegate::{Delegation, Grant, KINDS as DELEGABLE};
pub use discovery::{xdg_dir, Locations, Selection};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::PolicyError;
pub use explain::{Answer, Question, QuestionError};
pub use fs::{normalize_guest_path, Access};
pub use host::{
    address_class, canonical_ip, normalize_host, Cidr, HostError, HostPattern, NetHost,
};
pub use limits::parse_duration;
pub use mcp::RateLimiter;
pub use net::parse_host_port;
pub use policy::{
    LimitView, LimitsView, MountRefusal, MountView, Policy, PolicyBuilder, SourceInfo,
};
pub use preset::NAMES as PRESETS;
pub use rule::{Action, Decision, Layer, Mode, RuleInfo, Surface, Verdict};
pub use source::{Location, Source};
