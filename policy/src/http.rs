//! HTTP request rules: which methods and paths the guest may use on hosts
//! whose traffic the egress proxy reads (plain HTTP, or HTTPS it
//! intercepts). A host no rule names is not restricted here; once a rule
//! names it, whatever no rule allows there is denied.

use globset::GlobMatcher;
use toml::Spanned;

use crate::compile::Ctx;
use crate::format::RawHttpRule;
use crate::host::{HostPattern, NetHost};
use crate::rule::{RuleIdx, Surface};
use crate::PolicyError;

struct HttpRule {
    rule: RuleIdx,
    hosts: Vec<HostPattern>,
    /// Upper case; empty means every method.
    methods: Vec<String>,
    /// Globs over the path (query excluded); empty means every path.
    paths: Vec<GlobMatcher>,
}

#[derive(Default)]
pub(crate) struct HttpRules {
    rules: Vec<HttpRule>,
}

fn is_method(m: &str) -> bool {
    !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic())
}

impl HttpRules {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawHttpRule>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        let hosts = ctx.host_patterns(&r.hosts, raw.span().start)?;
        let mut methods = Vec::new();
        for m in &r.methods {
            if !is_method(m.get_ref()) {
                return Err(ctx.err(
                    m.span().start,
                    "a method is a word such as \"GET\" or \"POST\"",
                ));
            }
            methods.push(m.get_ref().to_ascii_uppercase());
        }
        let mut paths = Vec::new();
        for p in &r.paths {
            if !p.get_ref().starts_with('/') {
                return Err(ctx.err(
                    p.span().start,
                    "a path glob starts with `/`, such as \"/repos/acme/**\"",
                ));
            }
            paths.push(ctx.glob(p)?);
        }
        let list = |v: Vec<&str>, all: &str| {
            if v.is_empty() {
                all.to_string()
            } else {
                v.join(", ")
            }
        };
        let summary = format!(
            "{} {} on {} to {}",
            action.as_str(),
            list(methods.iter().map(String::as_str).collect(), "every method"),
            list(
                r.paths.iter().map(|p| p.get_ref().as_str()).collect(),
                "every path"
            ),
            r.hosts
                .iter()
                .map(|h| h.get_ref().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rule = ctx.table_rule(Surface::Http, raw, action, summary)?;
        self.rules.push(HttpRule {
            rule,
            hosts,
            methods,
            paths,
        });
        Ok(())
    }

    fn covers(r: &HttpRule, host: &NetHost) -> bool {
        r.hosts.iter().any(|p| p.covers(host))
    }

    /// Whether any rule names `host`.
    pub(crate) fn names(&self, host: &NetHost) -> bool {
        self.rules.iter().any(|r| Self::covers(r, host))
    }

    pub(crate) fn visit(
        &self,
        host: &NetHost,
        method: &str,
        path: &str,
        mut seen: impl FnMut(RuleIdx),
    ) {
        for r in &self.rules {
            if Self::covers(r, host)
                && (r.methods.is_empty()
                    || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
                && (r.paths.is_empty() || r.paths.iter().any(|g| g.is_match(path)))
            {
                seen(r.rule);
            }
        }
    }
}
