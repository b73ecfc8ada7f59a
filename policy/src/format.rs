//! The policy file as written (TOML), before it is checked and compiled.
//! Every table rejects unknown keys, so a misspelt key is an error with a
//! line number rather than a rule that silently does nothing.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) type S<T> = Spanned<T>;

/// The fields every rule table has besides its own: an optional id and reason.
pub(crate) trait RuleFields {
    fn id(&self) -> Option<&S<String>>;
    fn reason(&self) -> Option<&String>;
}

macro_rules! rule_fields {
    ($($table:ty),*) => {$(
        impl RuleFields for $table {
            fn id(&self) -> Option<&S<String>> {
                self.id.as_ref()
            }
            fn reason(&self) -> Option<&String> {
                self.reason.as_ref()
            }
        }
    )*};
}

rule_fields!(
    RawMount,
    RawFsRule,
    RawNetRule,
    RawHttpRule,
    RawCredential,
    RawMcpRule,
    RawExecRule
);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub version: Option<S<i64>>,
    pub layer: Option<S<String>>,
    pub mode: Option<S<String>>,
    pub preset: Option<S<String>>,
    #[serde(default)]
    pub mount: Vec<S<RawMount>>,
    #[serde(default)]
    pub fs: Vec<S<RawFsRule>>,
    #[serde(default)]
    pub network: Vec<S<RawNetRule>>,
    #[serde(default)]
    pub http: Vec<S<RawHttpRule>>,
    #[serde(default)]
    pub credential: Vec<S<RawCredential>>,
    #[serde(default)]
    pub mcp: Vec<S<RawMcpRule>>,
    #[serde(default)]
    pub exec: Vec<S<RawExecRule>>,
    pub limits: Option<S<RawLimits>>,
    /// What the org lets lower layers allow (org files only).
    pub delegate: Option<S<RawDelegate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelegate {
    pub team: Option<S<Vec<S<String>>>>,
    pub local: Option<S<Vec<S<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMount {
    pub id: Option<S<String>>,
    pub host: S<String>,
    pub guest: S<String>,
    pub mode: Option<S<String>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFsRule {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub paths: Vec<S<String>>,
    pub access: Option<S<String>>,
    /// `"leaving"`: the rule denies creating, at `paths`, symlinks whose
    /// target leaves their share, instead of reading or writing.
    pub links: Option<S<String>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetRule {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub to: Vec<S<String>>,
    #[serde(default)]
    pub ports: Vec<S<toml::Value>>,
    pub intercept: Option<S<bool>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttpRule {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub hosts: Vec<S<String>>,
    #[serde(default)]
    pub methods: Vec<S<String>>,
    #[serde(default)]
    pub paths: Vec<S<String>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredential {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub secret: S<String>,
    pub hosts: Vec<S<String>>,
    pub env: Option<S<String>>,
    pub header: Option<S<String>>,
    pub format: Option<S<String>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMcpRule {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub server: S<String>,
    pub tools: Option<Vec<S<String>>>,
    #[serde(default)]
    pub args: BTreeMap<String, S<RawArg>>,
    pub calls_per_minute: Option<S<i64>>,
    /// Record the arguments' values in the audit log, not only their digest.
    pub log_args: Option<bool>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArg {
    pub glob: Option<String>,
    pub regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExecRule {
    pub id: Option<S<String>>,
    pub action: S<String>,
    pub commands: Vec<S<String>>,
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub vcpus: Option<S<i64>>,
    pub memory_mib: Option<S<i64>>,
    pub disk_mib: Option<S<i64>>,
    pub lifetime: Option<S<String>>,
}
