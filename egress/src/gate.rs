//! The proxy's decisions, apart from how connections are carried: the
//! policy, the recorder every decision goes to first, the session's
//! secrets, the proxy's own built-in rules and limits, and what a refused
//! client is told. The tunnel (`proxy`) and the request layer (`http`)
//! both decide through a [`Gate`]; neither knows the other's insides.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;

use sbx_policy::{
    Action, Decision, Injection, Layer, Location, Mode, NetHost, Policy, RuleInfo, Surface, Verdict,
};

use std::time::Duration;

use crate::head::{self, Head};
use crate::secrets::{self, Secret, Secrets};

/// Bounds that keep one slow or hostile client from costing more than a
/// thread and a buffer for a bounded time.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request or response head.
    pub head_bytes: usize,
    /// Time for a client to send its whole head (and its ClientHello).
    pub head_time: Duration,
    pub connect_time: Duration,
    /// How long an upstream may take to start its response.
    pub response_time: Duration,
    /// Connections served at once; more are answered 503 at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_bytes: 32 * 1024,
            head_time: Duration::from_secs(10),
            connect_time: Duration::from_secs(10),
            response_time: Duration::from_secs(300),
            max_connections: 256,
        }
    }
}

/// Where decisions go: the session's audit log.
pub trait Recorder: Send + Sync {
    /// Records a decision and says whether the action may go ahead; a
    /// decision that cannot be recorded must not go ahead.
    fn decision(&self, surface: Surface, action: &str, resource: &str, d: &Decision<'_>) -> bool;
}

/// Where a request goes, once checked.
pub(crate) struct Target {
    pub host: NetHost,
    pub port: u16,
    /// Whether the guest's side is TLS (intercepted); secrets only go there.
    pub tls: bool,
}

/// The proxy's own rules, reported like policy rules.
pub(crate) struct Builtins {
    pub protocol: RuleInfo,
    pub sni: RuleInfo,
    pub plain_secret: RuleInfo,
}

fn builtin(id: &str, surface: Surface, summary: &str) -> RuleInfo {
    RuleInfo {
        id: id.into(),
        surface,
        action: Action::Deny,
        layer: Layer::Builtin,
        mode: Mode::Enforce,
        location: Location::builtin(),
        reason: None,
        summary: summary.into(),
    }
}

pub(crate) fn deny<'a>(rule: &'a RuleInfo, reason: String) -> Decision<'a> {
    Decision {
        verdict: Verdict::Deny,
        rule,
        reason: Cow::Owned(reason),
        matched: Vec::new(),
    }
}

/// Whether `text` (an SNI or a Host header's host) names `host`.
pub(crate) fn names(host: &NetHost, text: &str) -> bool {
    sbx_policy::normalize_host(text).ok().as_ref() == Some(host)
}

/// Why a connection ended before it was joined upstream: what the client
/// is told.
pub(crate) struct Refusal {
    pub code: u16,
    pub text: String,
}

impl Refusal {
    pub fn policy(what: &str, d: &Decision<'_>) -> Refusal {
        Refusal {
            code: 403,
            text: format!(
                "sbx egress proxy refused {what}: rule `{}` ({} layer, {}): {}\n",
                d.rule.id, d.rule.layer, d.rule.location, d.reason
            ),
        }
    }

    pub fn new(code: u16, text: String) -> Refusal {
        Refusal { code, text }
    }

    pub fn send(&self, w: &mut impl Write) {
        let reason = match self.code {
            400 => "Bad Request",
            403 => "Forbidden",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let _ = w.write_all(&head::response(self.code, reason, &self.text));
        let _ = w.flush();
    }
}

/// What every connection is decided by.
pub(crate) struct Gate {
    pub policy: Arc<Policy>,
    pub recorder: Arc<dyn Recorder>,
    pub secrets: Secrets,
    pub builtins: Builtins,
    pub limits: Limits,
}

impl Builtins {
    pub fn new() -> Builtins {
        Builtins {
            protocol: builtin(
                "proxy-protocol",
                Surface::Net,
                "requests the proxy cannot read safely are refused",
            ),
            sni: builtin(
                "sni-must-match",
                Surface::Net,
                "TLS through CONNECT, and the Host of every request the proxy reads, must name the host that was checked",
            ),
            plain_secret: builtin(
                "secrets-need-tls",
                Surface::Credential,
                "secrets are never sent over plain HTTP",
            ),
        }
    }
}

impl Gate {
    pub(crate) fn record(
        &self,
        surface: Surface,
        action: &str,
        what: &str,
        d: &Decision<'_>,
    ) -> bool {
        self.recorder.decision(surface, action, what, d)
    }

    /// Refuses a request the proxy cannot read safely: recorded under the
    /// built-in `proxy-protocol` rule, answered with `code`, naming the rule.
    pub(crate) fn refuse_protocol(
        &self,
        w: &mut impl Write,
        resource: &str,
        code: u16,
        why: String,
    ) {
        let d = deny(&self.builtins.protocol, why);
        self.record(Surface::Net, "request", resource, &d);
        let mut r = Refusal::policy("the request", &d);
        r.code = code;
        r.send(w);
    }

    /// May `s`'s placeholder go to this target? Records the decision under
    /// `action` and returns the refusal when it may not.
    pub(crate) fn secret_check(&self, t: &Target, s: &Secret, action: &str) -> Result<(), Refusal> {
        let what = format!("secret {} to {}", s.name, t.host);
        let (d, _) = self.policy.decide_credential(&s.name, &t.host);
        let d = if d.allowed() && !t.tls {
            deny(
                &self.builtins.plain_secret,
                format!("{what} over plain HTTP would send it in clear text"),
            )
        } else {
            d
        };
        let action = if d.allowed() { action } else { "exfiltration" };
        if self.record(Surface::Credential, action, &what, &d) {
            Ok(())
        } else {
            Err(Refusal::policy(
                &format!("the placeholder of secret {} sent to {}", s.name, t.host),
                &d,
            ))
        }
    }

    /// Applies request rules and secrets to the head; the refusal to send
    /// back if the request may not go.
    pub(crate) fn check_request(&self, t: &Target, req: &mut Head) -> Result<(), Refusal> {
        // A Host header naming another site than the one checked would have
        // a shared front end (a CDN) route the request there: inside a
        // checked tunnel, and in plain HTTP, whose URL was checked.
        if let Some(h) = req.get("host") {
            let text = String::from_utf8_lossy(h).into_owned();
            let named = text
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty())
                .map_or(text.as_str(), |(h, _)| h);
            if !names(&t.host, named) {
                let d = deny(
                    &self.builtins.sni,
                    format!("a request to {} carried Host: {text}", t.host),
                );
                self.record(
                    Surface::Net,
                    "request",
                    &format!("{} (Host {text})", t.host),
                    &d,
                );
                return Err(Refusal::policy("the request", &d));
            }
        }
        let path = req.second.split('?').next().unwrap_or_default().to_string();
        if let Some(d) = self.policy.decide_http(&t.host, &req.first, &path) {
            let what = format!("{} {}{path}", req.first, t.host);
            if !self.record(Surface::Http, "request", &what, &d) {
                return Err(Refusal::policy(&what, &d));
            }
        }
        if self.secrets.is_empty() {
            return Ok(());
        }
        let mut seen = req.second.as_bytes().to_vec();
        for (_, v) in &req.headers {
            seen.extend_from_slice(v);
            seen.push(b'\n');
        }
        for s in self.secrets.found_in(&seen) {
            self.secret_check(t, s, "substitute")?;
            let (from, to) = (s.placeholder.as_bytes(), s.value().as_bytes());
            req.second =
                String::from_utf8_lossy(&secrets::replace(req.second.as_bytes(), from, to))
                    .into_owned();
            for (_, v) in req.headers.iter_mut() {
                *v = secrets::replace(v, from, to);
            }
        }
        if t.tls {
            for s in self.secrets.iter() {
                let (d, grant) = self.policy.decide_credential(&s.name, &t.host);
                let Some(Injection::Header { name, format }) = grant.map(|g| &g.injection) else {
                    continue;
                };
                if d.allowed()
                    && self.record(
                        Surface::Credential,
                        "inject",
                        &format!("secret {} to {} as {name}", s.name, t.host),
                        &d,
                    )
                {
                    req.set(name, format.replace("{secret}", s.value()).into_bytes());
                }
            }
        }
        Ok(())
    }
}
