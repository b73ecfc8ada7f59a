//! Credential rules: which secret may be sent to which hosts, and how the
//! egress proxy puts it into the request.

use toml::Spanned;

use crate::compile::Ctx;
use crate::format::RawCredential;
use crate::host::{HostPattern, NetHost};
use crate::rule::{Action, RuleIdx, Surface};
use crate::PolicyError;

/// How the proxy puts a secret into requests to an allowed host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// Set this header to `format` with `{secret}` replaced by the value.
    Header { name: String, format: String },
    /// Replace the placeholder the guest holds wherever it appears in the
    /// request headers.
    Placeholder,
}

#[derive(Clone, Debug)]
pub struct CredentialGrant {
    pub secret: String,
    /// The guest environment variable that holds the placeholder.
    pub env: String,
    pub injection: Injection,
    pub(crate) rule: RuleIdx,
}

struct CredRule {
    rule: RuleIdx,
    /// A secret name, or `*` (deny rules only).
    secret: String,
    hosts: Vec<HostPattern>,
    grant: Option<CredentialGrant>,
}

#[derive(Default)]
pub(crate) struct CredentialRules {
    rules: Vec<CredRule>,
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn is_header(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn field<'a>(
    ctx: &Ctx,
    f: Option<&'a Spanned<String>>,
    check: fn(&str) -> bool,
    what: &str,
) -> Result<Option<&'a str>, PolicyError> {
    match f {
        Some(v) if !check(v.get_ref()) => Err(ctx.err(v.span().start, what.to_string())),
        Some(v) => Ok(Some(v.get_ref().as_str())),
        None => Ok(None),
    }
}

impl CredentialRules {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawCredential>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        let secret = r.secret.get_ref().clone();
        if !(is_name(&secret) || (secret == "*" && action == Action::Deny)) {
            return Err(ctx.err(
                r.secret.span().start,
                "a secret name is letters, digits and `_`, not starting with a digit (`*` is for deny rules)",
            ));
        }
        let hosts = ctx.host_patterns(&r.hosts, raw.span().start)?;
        let env = field(
            ctx,
            r.env.as_ref(),
            is_name,
            "an environment variable name is letters, digits and `_`",
        )?;
        let header = field(
            ctx,
            r.header.as_ref(),
            is_header,
            "not a valid HTTP header name",
        )?;
        let format = field(
            ctx,
            r.format.as_ref(),
            |f| f.matches("{secret}").count() == 1,
            "`format` must contain `{secret}` exactly once",
        )?;
        let grant = match action {
            Action::Deny => {
                if let Some(extra) = r.env.as_ref().or(r.header.as_ref()).or(r.format.as_ref()) {
                    return Err(ctx.err(
                        extra.span().start,
                        "a deny rule sends nothing: remove env, header and format",
                    ));
                }
                None
            }
            Action::Allow => {
                let injection =
                    match (header, format) {
                        (Some(name), f) => Injection::Header {
                            name: name.to_string(),
                            format: f.unwrap_or("{secret}").to_string(),
                        },
                        (None, Some(_)) => return Err(ctx.err(
                            r.format.as_ref().map_or(0, |f| f.span().start),
                            "`format` needs `header`: name the header the formatted value goes in",
                        )),
                        (None, None) => Injection::Placeholder,
                    };
                Some((env.unwrap_or(&secret).to_string(), injection))
            }
        };
        let host_list: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let how = match &grant {
            Some((env, Injection::Header { name, .. })) => {
                format!(" as header {name} (guest ${env} holds a placeholder)")
            }
            Some((env, Injection::Placeholder)) => format!(" by placeholder in ${env}"),
            None => String::new(),
        };
        let summary = format!(
            "{} secret {secret} to {}{how}",
            action.as_str(),
            host_list.join(", ")
        );
        let rule = ctx.table_rule(Surface::Credential, raw, action, summary)?;
        self.rules.push(CredRule {
            rule,
            secret: secret.clone(),
            hosts,
            grant: grant.map(|(env, injection)| CredentialGrant {
                secret,
                env,
                injection,
                rule,
            }),
        });
        Ok(())
    }

    pub(crate) fn visit(&self, secret: &str, host: &NetHost, mut seen: impl FnMut(RuleIdx)) {
        for r in &self.rules {
            if r.secret != "*" && r.secret != secret {
                continue;
            }
            if r.hosts.iter().any(|p| p.covers(host)) {
                seen(r.rule);
            }
        }
    }

    pub(crate) fn grant(&self, rule: RuleIdx) -> Option<&CredentialGrant> {
        self.rules
            .iter()
            .find(|r| r.rule == rule)
            .and_then(|r| r.grant.as_ref())
    }

    pub(crate) fn grants(&self) -> impl Iterator<Item = &CredentialGrant> {
        self.rules.iter().filter_map(|r| r.grant.as_ref())
    }
}
