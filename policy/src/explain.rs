//! Explaining one request: a question put to a policy the way people
//! write it (`api.github.com:443`, `/workspace/.env write`, `github.get_issue`
//! with its arguments), answered with the decision and every rule that
//! matched, most senior first. `sbx policy explain` and the dashboard's
//! explain page both ask through here.

use std::net::IpAddr;

use crate::credential::Injection;
use crate::fs::Access;
use crate::rule::{Decision, Surface};
use crate::{normalize_host, parse_host_port, Policy};

/// One request, as a person describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Question {
    /// A connection to HOST:PORT (`[v6]:PORT` for IPv6); `resolved` is the
    /// address the name resolved to, checked against address rules too.
    Net {
        target: String,
        resolved: Option<IpAddr>,
    },
    /// Reading or writing a guest path.
    Fs { path: String, access: Access },
    /// An MCP tool call, `SERVER.TOOL`, with its arguments as a JSON object.
    Mcp { call: String, args: Option<String> },
    /// Sending secret `secret` to `host`.
    Credential { secret: String, host: String },
    /// Running a command in the guest.
    Exec { command: String },
    /// A session with this many vCPUs and MiB of memory.
    Limits { vcpus: u64, memory_mib: u64 },
}

/// What the policy says, and about what.
pub struct Answer<'p> {
    pub surface: Surface,
    /// The request, restated (with what a credential rule would inject, or
    /// an MCP rule's rate).
    pub request: String,
    pub decision: Decision<'p>,
}

/// A question that does not say what it asks; the text says what to write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct QuestionError(pub String);

impl Policy {
    /// The decision on `q` and every rule that matched.
    pub fn explain(&self, q: &Question) -> Result<Answer<'_>, QuestionError> {
        let bad = |e: &dyn std::fmt::Display| QuestionError(e.to_string());
        let (surface, request, decision) = match q {
            Question::Net { target, resolved } => {
                let (host, port) = parse_host_port(target).map_err(|e| bad(&e))?;
                (
                    Surface::Net,
                    target.clone(),
                    self.explain_net(&host, *resolved, port),
                )
            }
            Question::Fs { path, access } => (
                Surface::Fs,
                format!("{path} {}", access.as_str()),
                self.explain_fs(path, *access),
            ),
            Question::Mcp { call, args } => {
                let Some((server, tool)) = call.split_once('.') else {
                    return Err(QuestionError(format!(
                        "`{call}` is not SERVER.TOOL, such as github.get_issue"
                    )));
                };
                let args: serde_json::Value = serde_json::from_str(args.as_deref().unwrap_or("{}"))
                    .map_err(|e| QuestionError(format!("the arguments are not valid JSON: {e}")))?;
                let Some(args) = args.as_object() else {
                    return Err(QuestionError(
                        "the arguments must be a JSON object, such as {\"repo\": \"acme/web\"}"
                            .into(),
                    ));
                };
                let (d, rate) = self.explain_mcp(server, tool, args);
                let request = match rate {
                    Some(n) => format!("{call} (at most {n} calls per minute)"),
                    None => call.clone(),
                };
                (Surface::Mcp, request, d)
            }
            Question::Credential { secret, host } => {
                let h = normalize_host(host).map_err(|e| bad(&e))?;
                let (d, grant) = self.explain_credential(secret, &h);
                let how = match grant.map(|g| &g.injection) {
                    Some(Injection::Header { name, format }) => format!(" as {name}: {format}"),
                    Some(Injection::Placeholder) => " by placeholder".into(),
                    None => String::new(),
                };
                (Surface::Credential, format!("{secret} to {host}{how}"), d)
            }
            Question::Exec { command } => {
                (Surface::Exec, command.clone(), self.explain_exec(command))
            }
            Question::Limits { vcpus, memory_mib } => (
                Surface::Limits,
                format!("{vcpus} vCPUs, {memory_mib} MiB"),
                self.decide_limits(*vcpus, *memory_mib),
            ),
        };
        Ok(Answer {
            surface,
            request,
            decision,
        })
    }
}
