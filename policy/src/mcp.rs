//! MCP tool rules: which servers and tools an agent may call, with which
//! arguments, and how often.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use globset::GlobMatcher;
use regex::Regex;
use toml::Spanned;

use crate::compile::Ctx;
use crate::format::RawMcpRule;
use crate::rule::{Action, RuleIdx, Surface};
use crate::PolicyError;

enum ArgMatcher {
    Glob(GlobMatcher),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

impl ArgMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ArgMatcher::Glob(g) => g.is_match(value),
            ArgMatcher::Regex(r) => r.is_match(value),
        }
    }
}

struct McpRule {
    rule: RuleIdx,
    server: GlobMatcher,
    tools: Vec<GlobMatcher>,
    args: Vec<(String, String, ArgMatcher)>,
    calls_per_minute: Option<u32>,
    log_args: bool,
}

#[derive(Default)]
pub(crate) struct McpRules {
    rules: Vec<McpRule>,
}

/// The text an argument constraint is matched against: strings as they
/// are, everything else as JSON.
fn arg_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Why an allow rule that named the tool did not match its arguments.
pub(crate) struct ArgMismatch {
    pub rule: RuleIdx,
    pub message: String,
}

impl McpRules {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawMcpRule>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        let server = ctx.glob(&r.server)?;
        let star = Spanned::new(0..0, "*".to_string());
        let tool_specs: Vec<&Spanned<String>> = match &r.tools {
            Some(t) => {
                ctx.non_empty(t, raw.span().start, "tools")?;
                t.iter().collect()
            }
            None => vec![&star],
        };
        let mut tools = Vec::new();
        for t in &tool_specs {
            tools.push(ctx.glob(t)?);
        }
        let mut args = Vec::new();
        for (name, spec) in &r.args {
            let at = spec.span().start;
            let m = match (&spec.get_ref().glob, &spec.get_ref().regex) {
                (Some(g), None) => {
                    let g = Spanned::new(spec.span(), g.clone());
                    (
                        format!("glob {}", g.get_ref()),
                        ArgMatcher::Glob(ctx.glob(&g)?),
                    )
                }
                (None, Some(re)) => {
                    let compiled = Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                        ctx.err(at, format!("bad regex for argument `{name}`: {e}"))
                    })?;
                    (format!("regex {re}"), ArgMatcher::Regex(compiled))
                }
                _ => {
                    return Err(ctx.err(
                        at,
                        format!("argument `{name}` needs exactly one of `glob` or `regex`"),
                    ))
                }
            };
            args.push((name.clone(), m.0, m.1));
        }
        let calls_per_minute = match &r.calls_per_minute {
            None => None,
            Some(c) if action == Action::Allow => Some(
                u32::try_from(*c.get_ref())
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ctx.err(c.span().start, "calls_per_minute is a positive number")
                    })?,
            ),
            Some(c) => {
                return Err(ctx.err(c.span().start, "calls_per_minute belongs on allow rules"))
            }
        };
        let tool_list: Vec<&str> = tool_specs.iter().map(|t| t.get_ref().as_str()).collect();
        let mut summary = format!(
            "{} {}.{{{}}}",
            action.as_str(),
            r.server.get_ref(),
            tool_list.join(",")
        );
        for (name, how, _) in &args {
            summary.push_str(&format!(" {name}~{how}"));
        }
        if let Some(n) = calls_per_minute {
            summary.push_str(&format!(" at most {n}/min"));
        }
        let log_args = r.log_args.unwrap_or(false);
        if log_args {
            summary.push_str(" (arguments logged)");
        }
        let rule = ctx.table_rule(Surface::Mcp, raw, action, summary)?;
        self.rules.push(McpRule {
            rule,
            server,
            tools,
            args,
            calls_per_minute,
            log_args,
        });
        Ok(())
    }

    /// Calls `seen` with every rule whose server, tool and argument
    /// constraints all match; returns the first allow rule that named the
    /// tool but refused an argument, to explain a denial.
    pub(crate) fn visit(
        &self,
        rules: &[crate::RuleInfo],
        server: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
        mut seen: impl FnMut(RuleIdx),
    ) -> Option<ArgMismatch> {
        let mut mismatch = None;
        for r in &self.rules {
            if !r.server.is_match(server) || !r.tools.iter().any(|t| t.is_match(tool)) {
                continue;
            }
            let failed = r
                .args
                .iter()
                .find_map(|(name, how, m)| match args.get(name) {
                    None => Some(format!("argument `{name}` is missing ({how} required)")),
                    Some(v) => {
                        let text = arg_text(v);
                        (!m.matches(&text))
                            .then(|| format!("argument `{name}`={text:?} does not match {how}"))
                    }
                });
            match failed {
                None => seen(r.rule),
                Some(message) => {
                    if mismatch.is_none() && rules[r.rule as usize].action == Action::Allow {
                        mismatch = Some(ArgMismatch {
                            rule: r.rule,
                            message,
                        });
                    }
                }
            }
        }
        mismatch
    }

    /// Whether `server.tool` belongs in a tool listing: some allow rule names
    /// it (whatever its argument constraints, which only a call can meet),
    /// and no enforced deny rule without argument constraints does.
    pub(crate) fn listed(&self, rules: &[crate::RuleInfo], server: &str, tool: &str) -> bool {
        let mut allowed = false;
        for r in &self.rules {
            if !r.server.is_match(server) || !r.tools.iter().any(|t| t.is_match(tool)) {
                continue;
            }
            let info = &rules[r.rule as usize];
            match info.action {
                Action::Allow => allowed = true,
                Action::Deny if r.args.is_empty() && info.mode == crate::Mode::Enforce => {
                    return false
                }
                Action::Deny => {}
            }
        }
        allowed
    }

    pub(crate) fn logs_args(&self, rule: RuleIdx) -> bool {
        self.rules.iter().any(|r| r.rule == rule && r.log_args)
    }

    pub(crate) fn calls_per_minute(&self, rule: RuleIdx) -> Option<u32> {
        self.rules
            .iter()
            .find(|r| r.rule == rule)
            .and_then(|r| r.calls_per_minute)
    }
}

/// Counts calls per key (a rule id) over a sliding minute, for the MCP
/// gateway to enforce `calls_per_minute`.
#[derive(Default)]
pub struct RateLimiter {
    calls: HashMap<String, VecDeque<Instant>>,
}

impl RateLimiter {
    /// Records a call at `now` and says whether it is within `per_minute`.
    /// A refused call is not counted.
    pub fn check(&mut self, key: &str, per_minute: u32, now: Instant) -> bool {
        let window = self.calls.entry(key.to_string()).or_default();
        while window
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= per_minute as usize {
            return false;
        }
        window.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_ignore_argument_constraints_but_not_unconditional_denies() {
        let mut b = crate::PolicyBuilder::new();
        b.add_text(
            "p.toml",
            r#"
[[mcp]]
action = "allow"
server = "files"
args.path = { glob = "/workspace/**" }

[[mcp]]
action = "deny"
server = "files"
tools = ["delete"]

[[mcp]]
action = "deny"
server = "files"
tools = ["write"]
args.path = { glob = "/etc/**" }
"#,
        )
        .unwrap();
        let p = b.build().unwrap();
        assert!(
            p.mcp_listed("files", "read"),
            "allowed with the right arguments"
        );
        assert!(
            !p.mcp_listed("files", "delete"),
            "denied whatever the arguments"
        );
        assert!(
            p.mcp_listed("files", "write"),
            "denied only for some arguments"
        );
        assert!(!p.mcp_listed("mail", "send"), "no rule names it");
    }

    #[test]
    fn rate_limiter_slides() {
        let mut r = RateLimiter::default();
        let t0 = Instant::now();
        assert!(r.check("a", 2, t0));
        assert!(r.check("a", 2, t0 + Duration::from_secs(1)));
        assert!(!r.check("a", 2, t0 + Duration::from_secs(2)));
        assert!(
            r.check("b", 2, t0 + Duration::from_secs(2)),
            "keys are separate"
        );
        assert!(r.check("a", 2, t0 + Duration::from_secs(60)));
        assert!(!r.check("a", 2, t0 + Duration::from_secs(60)));
        assert!(r.check("a", 2, t0 + Duration::from_secs(61)));
    }
}
