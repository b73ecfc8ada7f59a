//! Built-in presets: the least senior layer, which the files build on.

use crate::PolicyError;

pub const DEFAULT: &str = "locked-down";
pub const NAMES: [&str; 3] = ["locked-down", "balanced", "open"];

pub fn text(name: &str) -> Result<&'static str, PolicyError> {
    match name {
        "locked-down" => Ok(include_str!("../presets/locked-down.toml")),
        "balanced" => Ok(include_str!("../presets/balanced.toml")),
        "open" => Ok(include_str!("../presets/open.toml")),
        other => Err(PolicyError::UnknownPreset(other.to_string())),
    }
}
