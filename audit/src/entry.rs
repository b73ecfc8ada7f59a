//! The kinds of record a session writes, one constructor each, so that a
//! kind's action name, category and fields are decided here once and not
//! by whoever writes it.

use sbx_policy::{Decision, MountRefusal, RuleInfo, Surface};
use serde_json::{json, Value};

use crate::{decision_event, Category, Event};

/// One record to append: its category and what happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub category: Category,
    pub event: Event,
}

/// What the guest agent or the guest console reported.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GuestReport {
    AgentReady,
    ProcessStarted,
    ProcessExited,
    /// Seen on the console, not reported by the guest.
    KernelPanic,
    /// Seen on the console, not reported by the guest.
    KernelOops,
}

impl GuestReport {
    pub fn action(self) -> &'static str {
        match self {
            GuestReport::AgentReady => "agent_ready",
            GuestReport::ProcessStarted => "process_started",
            GuestReport::ProcessExited => "process_exited",
            GuestReport::KernelPanic => "kernel_panic",
            GuestReport::KernelOops => "kernel_oops",
        }
    }
}

/// The rule a device refusal names: a policy rule, or the device's own
/// protection (layer `builtin`, no file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCite<'a> {
    pub id: &'a str,
    pub layer: &'a str,
    pub location: Option<&'a str>,
}

/// How a denial is told to people: what was refused, why, and the rule
/// with its layer and file:line.
pub fn denial(action: &str, resource: &str, d: &Decision<'_>) -> String {
    format!(
        "policy denies {action} {resource}: {} (rule `{}`, {} layer, {})",
        d.reason, d.rule.id, d.rule.layer, d.rule.location
    )
}

fn session(action: &str, resource: &str, details: Value) -> Entry {
    Entry {
        category: Category::Session,
        event: Event {
            action: action.into(),
            resource: resource.into(),
            details,
            ..Event::default()
        },
    }
}

impl Entry {
    /// A policy decision.
    pub fn decision(surface: Surface, action: &str, resource: &str, d: &Decision<'_>) -> Entry {
        Entry {
            category: Category::Decision,
            event: decision_event(surface, action, resource, d),
        }
    }

    /// The session starts, with its size and the policy files it runs under.
    pub fn session_start(name: &str, vcpus: u32, mem_mib: u64, policy: &[&str]) -> Entry {
        session(
            "start",
            name,
            json!({ "vcpus": vcpus, "mem_mib": mem_mib, "policy": policy }),
        )
    }

    /// The session's VM ended; `details` says how.
    pub fn session_stop(name: &str, details: Value) -> Entry {
        session("stop", name, details)
    }

    /// A share the session asked for was refused before boot.
    pub fn mount_refused(resource: &str, refusal: &MountRefusal) -> Entry {
        let rule = refusal.rule.as_ref();
        Entry {
            category: Category::Decision,
            event: Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: "mount".into(),
                resource: resource.into(),
                decision: Some("deny".into()),
                rule_id: rule.map(|r| r.id.clone()),
                layer: rule.map(|r| r.layer.as_str().into()),
                rule_source: rule.map(|r| r.location.to_string()),
                reason: Some(refusal.reason.clone()),
                mode: Some("enforce".into()),
                details: Value::Null,
            },
        }
    }

    /// A share is served: by which rule, under which tag and cache mode.
    pub fn mounted(resource: &str, rule: &RuleInfo, tag: &str, cache: &str) -> Entry {
        Entry {
            category: Category::Session,
            event: Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: "mount".into(),
                resource: resource.into(),
                rule_id: Some(rule.id.clone()),
                layer: Some(rule.layer.as_str().into()),
                rule_source: Some(rule.location.to_string()),
                details: json!({ "tag": tag, "cache": cache }),
                ..Event::default()
            },
        }
    }

    /// A share refused a guest request (`op` is the file operation).
    pub fn fs_denied(op: &str, path: &str, rule: &RuleCite<'_>, reason: &str) -> Entry {
        Entry {
            category: Category::Decision,
            event: Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: op.into(),
                resource: path.into(),
                decision: Some("deny".into()),
                rule_id: Some(rule.id.into()),
                layer: Some(rule.layer.into()),
                rule_source: rule.location.map(str::to_string),
                reason: Some(reason.into()),
                mode: Some("enforce".into()),
                details: Value::Null,
            },
        }
    }

    /// The guest made a symlink at `path` whose `target` leaves its share
    /// (no rule refuses it): a host tool that follows it reads a host file.
    pub fn leaving_link(path: &str, target: &str) -> Entry {
        Entry {
            category: Category::Guest,
            event: Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: "symlink_out".into(),
                resource: path.into(),
                details: json!({ "target": target }),
                ..Event::default()
            },
        }
    }

    /// What the guest changed in its shares over a few seconds: `summary`
    /// in words, `details` per kind of change.
    pub fn file_changes(summary: &str, details: Value) -> Entry {
        Entry {
            category: Category::Guest,
            event: Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: "file_changes".into(),
                resource: summary.into(),
                details,
                ..Event::default()
            },
        }
    }

    /// The egress proxy serves the session: on which port, with which
    /// secrets (names only) and host settings.
    pub fn egress_started(port: u32, secrets: &[&str], settings: Value) -> Entry {
        let mut details = json!({ "secrets": secrets });
        if let (Some(d), Value::Object(extra)) = (details.as_object_mut(), settings) {
            d.extend(extra);
        }
        Entry {
            category: Category::Session,
            event: Event {
                surface: Some(Surface::Net.as_str().into()),
                action: "egress".into(),
                resource: format!("vsock port {port}"),
                details,
                ..Event::default()
            },
        }
    }

    /// The session process confined itself (Landlock): how far the kernel
    /// enforces it (`full`, `partial`, `none`), at which ABI, and to what.
    pub fn confined(how: &str, details: Value) -> Entry {
        session("confined", how, details)
    }

    /// What the session process kept of its privileges: `kept` names the
    /// capabilities (none for an ordinary user).
    pub fn privileges(kept: &[&str], dropped: u32) -> Entry {
        session(
            "privileges",
            if kept.is_empty() { "none" } else { "shares" },
            json!({ "kept": kept, "dropped": dropped, "no_new_privs": true }),
        )
    }

    /// The session process's cgroup (`none` where the host delegates
    /// none); `details` holds its limits, or why not and what would help.
    pub fn cgroup(path: &str, details: Value) -> Entry {
        session("cgroup", path, details)
    }

    /// How the session's threads are filtered (`mode`: enforce, log or
    /// off); `details` says which kinds, or which flag turned them off.
    pub fn seccomp(mode: &str, details: Value) -> Entry {
        session("seccomp", mode, details)
    }

    /// A session thread made a system call outside its seccomp filter; the
    /// session ends. `details` names the thread, its kind and the number.
    pub fn seccomp_violation(syscall: &str, details: Value) -> Entry {
        session("seccomp_violation", syscall, details)
    }

    /// `sbx pause` stopped the session's vCPUs (its memory kept), or
    /// `sbx resume` let them run again; `details` says how long it took.
    pub fn paused(paused: bool, details: Value) -> Entry {
        let action = if paused { "pause" } else { "resume" };
        session(action, "vm", details)
    }

    /// A credential rule grants a secret that was never stored.
    pub fn secret_missing(secret: &str, rule: &RuleInfo) -> Entry {
        Entry {
            category: Category::Session,
            event: Event {
                surface: Some(Surface::Credential.as_str().into()),
                action: "secret_missing".into(),
                resource: secret.into(),
                rule_id: Some(rule.id.clone()),
                rule_source: Some(rule.location.to_string()),
                reason: Some(format!(
                    "rule `{}` grants secret {secret} but it is not stored; run `sbx secret set {secret}`",
                    rule.id
                )),
                ..Event::default()
            },
        }
    }

    /// Records of one kind the guest caused faster than they are written:
    /// `count` were counted instead (the host's own record, not the guest's).
    pub fn dropped(what: &str, count: u64) -> Entry {
        session(
            "records_dropped",
            what,
            json!({ "count": count, "why": "the guest caused them faster than they are recorded" }),
        )
    }

    /// The MCP gateway's decision on a request (`action` is `call`, `read`
    /// or `get`; `resource` is `server.name`), with what the request
    /// carried (`details`: the arguments' digest, and their values only when
    /// the policy says so).
    pub fn mcp_decision(action: &str, resource: &str, d: &Decision<'_>, details: Value) -> Entry {
        let mut e = Entry::decision(Surface::Mcp, action, resource, d);
        e.event.details = details;
        e
    }

    /// The MCP gateway refused a request by one of its own protections
    /// (`rule`: `mcp-pin`, `mcp-secret-scan`, `mcp-credential-scan`), not
    /// by a policy rule.
    pub fn mcp_refused(
        action: &str,
        resource: &str,
        rule: &str,
        reason: &str,
        details: Value,
    ) -> Entry {
        Entry {
            category: Category::Decision,
            event: Event {
                surface: Some(Surface::Mcp.as_str().into()),
                action: action.into(),
                resource: resource.into(),
                decision: Some("deny".into()),
                rule_id: Some(rule.into()),
                layer: Some("builtin".into()),
                rule_source: Some("builtin".into()),
                reason: Some(reason.into()),
                mode: Some("enforce".into()),
                details,
            },
        }
    }

    /// How an allowed MCP request ended: latency, result size, error.
    pub fn mcp_result(action: &str, resource: &str, details: Value) -> Entry {
        Entry {
            category: Category::Session,
            event: Event {
                surface: Some(Surface::Mcp.as_str().into()),
                action: format!("{action}_result"),
                resource: resource.into(),
                details,
                ..Event::default()
            },
        }
    }

    /// Something the gateway learnt about a server's tools: `tool_pinned`
    /// (first seen), `tool_changed` (quarantined, both hashes), `tool_approved`,
    /// `tool_flagged` (a description that asks for secrets or other tools),
    /// `server_started`, `server_failed`.
    pub fn mcp_server(action: &str, resource: &str, details: Value) -> Entry {
        Entry {
            category: Category::Session,
            event: Event {
                surface: Some(Surface::Mcp.as_str().into()),
                action: action.into(),
                resource: resource.into(),
                details,
                ..Event::default()
            },
        }
    }

    /// Something the guest reported, or the console showed.
    pub fn guest(report: GuestReport, resource: &str, details: Value) -> Entry {
        Entry {
            category: Category::Guest,
            event: Event {
                action: report.action().into(),
                resource: resource.into(),
                details,
                ..Event::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_details_keep_their_order_and_names() {
        let e = Entry::egress_started(
            1026,
            &["A"],
            json!({ "upstream_ca": [], "resolve": ["x:1.2.3.4"] }),
        );
        assert_eq!(e.category, Category::Session);
        assert_eq!(e.event.resource, "vsock port 1026");
        assert_eq!(e.event.details["secrets"], json!(["A"]));
        assert_eq!(e.event.details["resolve"], json!(["x:1.2.3.4"]));
    }

    #[test]
    fn device_refusals_cite_their_rule() {
        let e = Entry::fs_denied(
            "open",
            "/workspace/.env",
            &RuleCite {
                id: "deny-env",
                layer: "team",
                location: Some("policy.toml:3"),
            },
            "secrets stay on the host",
        );
        assert_eq!(e.category, Category::Decision);
        assert_eq!(e.event.layer.as_deref(), Some("team"));
        assert_eq!(e.event.rule_source.as_deref(), Some("policy.toml:3"));
        assert_eq!(e.event.decision.as_deref(), Some("deny"));
    }
}
