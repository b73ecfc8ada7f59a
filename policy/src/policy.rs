//! A merged policy: layers loaded in order of seniority, compiled once,
//! asked many times.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::bundle;
use crate::compile::Ctx;
use crate::credential::{CredentialGrant, CredentialRules};
use crate::delegate::{Audience, Delegation};
use crate::exec::ExecRules;
use crate::format::RawFile;
use crate::fs::{normalize_guest_path, Access, FsAct, FsRules, Mount};
use crate::host::NetHost;
use crate::http::HttpRules;
use crate::limits::Limits;
use crate::mcp::McpRules;
use crate::net::NetRules;
use crate::preset;
use crate::rule::{Action, Decision, Layer, Mode, RuleIdx, RuleInfo, Surface, Tally, Verdict};
use crate::{Location, PolicyError, Source};

/// One loaded rule set.
#[derive(Clone, Debug, Serialize)]
pub struct SourceInfo {
    pub name: String,
    pub layer: Layer,
    pub mode: Mode,
    /// The id of the key that signed it, for bundles.
    pub signed_by: Option<String>,
}

struct Parsed {
    src: Source,
    raw: RawFile,
    info: SourceInfo,
}

/// Collects rule sets, then compiles them into a [`Policy`].
#[derive(Default)]
pub struct PolicyBuilder {
    files: Vec<Parsed>,
    preset: Option<String>,
    trusted: Vec<VerifyingKey>,
}

impl PolicyBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a key for signed bundles. Once any key is trusted, org-layer
    /// rule sets must be signed bundles.
    pub fn trust(&mut self, key: VerifyingKey) -> &mut Self {
        self.trusted.push(key);
        self
    }

    /// Starts from this preset instead of the one the files name.
    pub fn preset(&mut self, name: &str) -> Result<&mut Self, PolicyError> {
        preset::text(name)?;
        self.preset = Some(name.to_string());
        Ok(self)
    }

    pub fn add_file(&mut self, path: &Path) -> Result<&mut Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.add_text(&path.display().to_string(), &text)
    }

    /// Adds a rule set (plain TOML or a signed bundle) named `name` in errors.
    pub fn add_text(&mut self, name: &str, text: &str) -> Result<&mut Self, PolicyError> {
        let (src, default_layer, signed_by) = if bundle::is_bundle(text) {
            let opened =
                bundle::open(text, &self.trusted).map_err(|reason| PolicyError::Bundle {
                    file: name.to_string(),
                    reason,
                })?;
            let mut src = Source::new(name, opened.policy);
            src.line_offset = opened.line_offset;
            (src, Layer::Org, Some(bundle::key_id(&opened.key)))
        } else {
            (Source::new(name, text), Layer::Project, None)
        };
        let parsed = parse(src, default_layer, signed_by)?;
        if parsed.info.layer == Layer::Org
            && parsed.info.signed_by.is_none()
            && !self.trusted.is_empty()
        {
            return Err(PolicyError::Bundle {
                file: name.to_string(),
                reason: "an org-layer policy must be a signed bundle when trusted keys are configured (sign it with `sbx policy sign`)".into(),
            });
        }
        self.files.push(parsed);
        Ok(self)
    }

    pub fn build(mut self) -> Result<Policy, PolicyError> {
        // Stable: files of one layer keep the order they were given in.
        self.files.sort_by_key(|p| p.info.layer);
        let preset = match self.preset.take() {
            Some(p) => p,
            // `parse` already refused unknown preset names.
            None => match self.files.iter().rev().find_map(|p| p.raw.preset.as_ref()) {
                Some(p) => p.get_ref().clone(),
                None => preset::DEFAULT.to_string(),
            },
        };
        let preset_src = Source::new(format!("preset:{preset}"), preset::text(&preset)?);
        self.files.push(parse(preset_src, Layer::Preset, None)?);

        let mut p = Policy::empty(preset);
        for file in self.files.iter().filter(|f| f.info.layer == Layer::Org) {
            p.delegation.add(&file.src, &file.raw)?;
        }
        for file in &self.files {
            // Signed team bundles speak for the team; an unsigned file that
            // says it is a team's, once keys are trusted, does not.
            let audience = match file.info.layer {
                Layer::Org | Layer::Preset | Layer::Builtin => None,
                Layer::Team if file.info.signed_by.is_some() || self.trusted.is_empty() => {
                    Some(Audience::Team)
                }
                _ => Some(Audience::Local),
            };
            if let Some(a) = audience {
                p.delegation.check(&file.src, &file.raw, a)?;
            }
            p.compile(file)?;
            p.sources.push(file.info.clone());
        }
        p.fs.seal()?;
        Ok(p)
    }
}

fn parse(
    src: Source,
    default_layer: Layer,
    signed_by: Option<String>,
) -> Result<Parsed, PolicyError> {
    let raw: RawFile = toml::from_str(&src.text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        PolicyError::invalid(&src, at, e.message().trim_end().to_string())
    })?;
    if let Some(v) = &raw.version {
        if *v.get_ref() != 1 {
            return Err(PolicyError::invalid(
                &src,
                v.span().start,
                "this sbx reads policy version 1",
            ));
        }
    }
    let layer = match &raw.layer {
        None => default_layer,
        Some(l) => Layer::parse(l.get_ref()).ok_or_else(|| {
            PolicyError::invalid(
                &src,
                l.span().start,
                format!(
                    "layer `{}` is not \"org\", \"team\" or \"project\"",
                    l.get_ref()
                ),
            )
        })?,
    };
    let mode = match raw
        .mode
        .as_ref()
        .map(|m| (m.get_ref().as_str(), m.span().start))
    {
        None | Some(("enforce", _)) => Mode::Enforce,
        Some(("audit", _)) => Mode::Audit,
        Some((other, at)) => {
            return Err(PolicyError::invalid(
                &src,
                at,
                format!("mode `{other}` is not \"enforce\" or \"audit\""),
            ))
        }
    };
    if let (Some(d), false) = (&raw.delegate, layer == Layer::Org) {
        return Err(PolicyError::invalid(
            &src,
            d.span().start,
            format!(
                "only the org policy delegates: remove [delegate] from this {} policy",
                layer.as_str()
            ),
        ));
    }
    if let Some(p) = &raw.preset {
        if preset::text(p.get_ref()).is_err() {
            return Err(PolicyError::invalid(
                &src,
                p.span().start,
                format!(
                    "unknown preset `{}`: the presets are locked-down, balanced and open",
                    p.get_ref()
                ),
            ));
        }
    }
    let info = SourceInfo {
        name: src.name.to_string(),
        layer,
        mode,
        signed_by,
    };
    Ok(Parsed { src, raw, info })
}

fn builtin(id: &str, surface: Surface, action: Action, summary: &str) -> RuleInfo {
    RuleInfo {
        id: id.to_string(),
        surface,
        action,
        layer: Layer::Builtin,
        mode: Mode::Enforce,
        location: Location::builtin(),
        reason: None,
        summary: summary.to_string(),
    }
}

/// A mount as the policy grants it.
#[derive(Debug, Serialize)]
pub struct MountView<'p> {
    pub host: &'p Path,
    pub guest: &'p str,
    pub read_only: bool,
    pub rule: &'p RuleInfo,
}

/// A limit and the rule that set it.
#[derive(Debug, Serialize)]
pub struct LimitView<'p, T> {
    pub value: T,
    pub rule: &'p RuleInfo,
}

#[derive(Debug, Serialize)]
pub struct LimitsView<'p> {
    pub vcpus: Option<LimitView<'p, u64>>,
    pub memory_mib: Option<LimitView<'p, u64>>,
    pub disk_mib: Option<LimitView<'p, u64>>,
    pub lifetime_secs: Option<LimitView<'p, u64>>,
}

/// A limit (its value and rule, if set), what is asked, and its unit.
type Ask<'a> = (Option<(u64, RuleIdx)>, u64, &'a str);

/// Why a session mount was refused.
#[derive(Debug)]
pub struct MountRefusal {
    /// The rule that refused it; none when the mount itself is malformed.
    pub rule: Option<Box<RuleInfo>>,
    pub reason: String,
}

impl std::fmt::Display for MountRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The effective policy of a session.
pub struct Policy {
    preset: String,
    rules: Vec<RuleInfo>,
    sources: Vec<SourceInfo>,
    delegation: Delegation,
    net: NetRules,
    http: HttpRules,
    fs: FsRules,
    creds: CredentialRules,
    mcp: McpRules,
    exec: ExecRules,
    limits: Limits,
    defaults: Vec<RuleInfo>,
    within_limits: RuleInfo,
    non_public: RuleInfo,
}

fn because(rule: &RuleInfo, verdict: Verdict, what: &str) -> String {
    match (verdict, rule.mode) {
        (Verdict::Deny, Mode::Audit) => format!(
            "{what} matches `{}` ({}); audit mode: recorded, not enforced",
            rule.id, rule.summary
        ),
        _ => format!("{what} matches `{}` ({})", rule.id, rule.summary),
    }
}

impl Policy {
    fn empty(preset: String) -> Self {
        let defaults = Surface::ALL
            .iter()
            .map(|s| {
                builtin(
                    "default-deny",
                    *s,
                    Action::Deny,
                    "whatever no rule allows is denied",
                )
            })
            .collect();
        Policy {
            preset,
            rules: Vec::new(),
            sources: Vec::new(),
            delegation: Delegation::default(),
            net: NetRules::default(),
            http: HttpRules::default(),
            fs: FsRules::default(),
            creds: CredentialRules::default(),
            mcp: McpRules::default(),
            exec: ExecRules::default(),
            limits: Limits::default(),
            defaults,
            within_limits: builtin(
                "within-limits",
                Surface::Limits,
                Action::Allow,
                "requests within every limit are allowed",
            ),
            non_public: builtin(
                "non-public-address",
                Surface::Net,
                Action::Deny,
                "loopback, private, link-local and metadata addresses, unless an address rule names them",
            ),
        }
    }

    fn compile(&mut self, file: &Parsed) -> Result<(), PolicyError> {
        let mut ctx = Ctx::new(&file.src, file.info.layer, file.info.mode, &mut self.rules);
        let raw = &file.raw;
        for m in &raw.mount {
            self.fs.add_mount(&mut ctx, m)?;
        }
        for r in &raw.fs {
            self.fs.add_rule(&mut ctx, r)?;
        }
        for r in &raw.network {
            self.net.add(&mut ctx, r)?;
        }
        for r in &raw.http {
            self.http.add(&mut ctx, r)?;
        }
        for r in &raw.credential {
            self.creds.add(&mut ctx, r)?;
        }
        for r in &raw.mcp {
            self.mcp.add(&mut ctx, r)?;
        }
        for r in &raw.exec {
            self.exec.add(&mut ctx, r)?;
        }
        if let Some(l) = &raw.limits {
            self.limits.add(&mut ctx, l)?;
        }
        Ok(())
    }

    /// Only the built-in default: everything denied. For tests and for
    /// callers that must fail closed without a policy.
    pub fn deny_all() -> Policy {
        Policy::empty("none".into())
    }

    pub fn preset_name(&self) -> &str {
        &self.preset
    }

    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    pub fn sources(&self) -> &[SourceInfo] {
        &self.sources
    }

    /// What the org lets team and local policy allow.
    pub fn delegation(&self) -> &Delegation {
        &self.delegation
    }

    fn default_rule(&self, s: Surface) -> &RuleInfo {
        &self.defaults[Surface::ALL.iter().position(|x| *x == s).unwrap_or(0)]
    }

    /// May the guest connect to `host` on `port`? `resolved` is the address
    /// the host resolved a name to, checked against address rules too.
    pub fn decide_net(&self, host: &NetHost, resolved: Option<IpAddr>, port: u16) -> Decision<'_> {
        self.net_inner(host, resolved, port, false)
    }

    /// As [`Policy::decide_net`], listing every rule that matched.
    pub fn explain_net(&self, host: &NetHost, resolved: Option<IpAddr>, port: u16) -> Decision<'_> {
        self.net_inner(host, resolved, port, true)
    }

    fn net_inner(
        &self,
        host: &NetHost,
        resolved: Option<IpAddr>,
        port: u16,
        explain: bool,
    ) -> Decision<'_> {
        let mut t = Tally::new(explain);
        self.net
            .visit(host, resolved, port, |i| t.see(&self.rules, i));
        let what = || match resolved {
            Some(a) => format!("{host}:{port} ({a})"),
            None => format!("{host}:{port}"),
        };
        t.decide(
            &self.rules,
            self.default_rule(Surface::Net),
            || {
                format!(
                    "no rule allows {}; the network is closed by default",
                    what()
                )
            },
            |r, v| because(r, v, &what()),
        )
    }

    /// May the guest connect to `host` on `port` at `addr`, the address the
    /// proxy resolved and will connect to? As [`Policy::decide_net`], and
    /// then a non-public address (loopback, private, link-local, cloud
    /// metadata) is refused unless an allow rule names that address or its
    /// network: allowing a name does not allow whatever it resolves to.
    pub fn decide_connect(&self, host: &NetHost, addr: IpAddr, port: u16) -> Decision<'_> {
        let d = self.decide_net(host, Some(addr), port);
        let Some(class) = crate::host::address_class(addr) else {
            return d;
        };
        if !d.allowed() {
            return d;
        }
        let mut t = Tally::new(false);
        self.net.visit_addr(addr, port, |i| t.see(&self.rules, i));
        if t.allow().is_some() {
            return d;
        }
        let what = match host {
            NetHost::Ip(_) => format!("{host} is {class}"),
            NetHost::Name(_) => format!("{host} resolves to {addr}, {class}"),
        };
        Decision {
            verdict: Verdict::Deny,
            rule: &self.non_public,
            reason: format!(
                "{what}; only a network rule that names the address or its network allows it"
            )
            .into(),
            matched: Vec::new(),
        }
    }

    /// Whether the proxy must only tunnel to `host`, never terminate its
    /// TLS (an allow rule says `intercept = false`).
    pub fn passthrough(&self, host: &NetHost) -> bool {
        self.net.passthrough(host)
    }

    /// Whether request rules restrict `host`, so the proxy must read its
    /// requests.
    pub fn restricts_http(&self, host: &NetHost) -> bool {
        self.http.names(host)
    }

    /// May the guest send `method` to `path` (without the query) on
    /// `host`? None when no request rule names the host.
    pub fn decide_http(&self, host: &NetHost, method: &str, path: &str) -> Option<Decision<'_>> {
        if !self.http.names(host) {
            return None;
        }
        let mut t = Tally::new(false);
        self.http
            .visit(host, method, path, |i| t.see(&self.rules, i));
        let what = format!("{method} {host}{path}");
        Some(t.decide(
            &self.rules,
            self.default_rule(Surface::Http),
            || format!("request rules name {host} and none allows {what}"),
            |r, v| because(r, v, &what),
        ))
    }

    /// May the guest read or write `path` (a guest path)?
    pub fn decide_fs(&self, path: &str, access: Access) -> Decision<'_> {
        self.fs_inner(path, access, false)
    }

    pub fn explain_fs(&self, path: &str, access: Access) -> Decision<'_> {
        self.fs_inner(path, access, true)
    }

    fn fs_inner(&self, path: &str, access: Access, explain: bool) -> Decision<'_> {
        let default = self.default_rule(Surface::Fs);
        let deny = |reason: String| Decision {
            verdict: Verdict::Deny,
            rule: default,
            reason: Cow::Owned(reason),
            matched: Vec::new(),
        };
        let Some(path) = normalize_guest_path(path) else {
            return deny(format!("`{path}` is not an absolute guest path"));
        };
        let Some((mount, rel)) = self.fs.mount_of(&path) else {
            return deny(format!(
                "{path} is not under any mount; the guest sees only mounted directories"
            ));
        };
        let mut t = Tally::new(explain);
        t.see(&self.rules, mount.rule);
        self.fs
            .visit_denies(&path, rel, FsAct::Access(access), |i| t.see(&self.rules, i));
        // Every file the guest touches comes here: the words are made only
        // for the decision that needs them.
        let what = || format!("{} of {path}", access.as_str());
        let mount_rule = &self.rules[mount.rule as usize];
        if access == Access::Write && mount.read_only && !t.enforced_deny() {
            return Decision {
                verdict: Verdict::Deny,
                rule: mount_rule,
                reason: Cow::Owned(format!(
                    "{path} is on mount {} ({}), which is read-only",
                    mount.guest, mount_rule.id
                )),
                matched: t.matched(&self.rules),
            };
        }
        // The mount's allow is always in the tally, so the default is never used.
        t.decide(
            &self.rules,
            default,
            || format!("no rule allows {}", what()),
            |r, v| because(r, v, &what()),
        )
    }

    /// Creating a symlink at `path` whose target (`target`, as the guest
    /// wrote it) leaves its share: a host tool that follows it reads a host
    /// file. The deny that covers it (`links = "leaving"`), an enforced one
    /// before one in audit mode, the most senior of either; None when no
    /// rule denies it, and the link is made (and recorded).
    pub fn decide_leaving_link(&self, path: &str, target: &str) -> Option<Decision<'_>> {
        let path = normalize_guest_path(path)?;
        let (_, rel) = self.fs.mount_of(&path)?;
        let mut denies: Vec<RuleIdx> = Vec::new();
        self.fs
            .visit_denies(&path, rel, FsAct::LeavingLink, |i| denies.push(i));
        let i = denies
            .into_iter()
            .min_by_key(|&i| (self.rules[i as usize].mode != Mode::Enforce, i))?;
        let rule = &self.rules[i as usize];
        Some(Decision {
            verdict: Verdict::Deny,
            rule,
            reason: Cow::Owned(format!(
                "the symlink {path} -> {target} leaves its share (a host tool that follows it reads a host file)"
            )),
            matched: Vec::new(),
        })
    }

    /// Adds a mount given for this session (`sbx start --mount`). Deny rules
    /// are checked against the guest path and against the host directory
    /// itself, so `--mount ~/.ssh:/keys` meets the same rule as a `.ssh`
    /// inside a mount. A refusal names the rule; nothing is added then.
    pub fn grant_mount(
        &mut self,
        host: &Path,
        guest: &str,
        read_only: bool,
    ) -> Result<(), MountRefusal> {
        let refuse = |reason: String| MountRefusal { rule: None, reason };
        let guest = normalize_guest_path(guest)
            .ok_or_else(|| refuse(format!("the guest path `{guest}` must be absolute")))?;
        if let Some(why) = crate::fs::bad_mount_point(&guest) {
            return Err(refuse(why));
        }
        let host_rel = host.to_string_lossy().trim_start_matches('/').to_string();
        let mut t = Tally::new(false);
        for access in [Access::Read, Access::Write] {
            if access == Access::Read || !read_only {
                self.fs
                    .visit_denies(&guest, &host_rel, FsAct::Access(access), |i| {
                        t.see(&self.rules, i)
                    });
            }
        }
        if let Some((i, _)) = t.winner().filter(|_| t.enforced_deny()) {
            let rule = Box::new(self.rules[i as usize].clone());
            let reason = format!(
                "mounting {} at {guest} is denied by `{}` ({}, {} layer): {}{}",
                host.display(),
                rule.id,
                rule.location,
                rule.layer,
                rule.reason.as_deref().unwrap_or(&rule.summary),
                if read_only {
                    ""
                } else {
                    "; a read-only mount (:ro) may be allowed"
                }
            );
            return Err(MountRefusal {
                rule: Some(rule),
                reason,
            });
        }
        if let Some(prev) = self.fs.mounts.iter_mut().find(|m| m.guest == guest) {
            if prev.host != host {
                let rule = &self.rules[prev.rule as usize];
                return Err(MountRefusal {
                    reason: format!(
                        "{guest} is already mounted from {} by `{}` ({}); choose another guest path",
                        prev.host.display(),
                        rule.id,
                        rule.location
                    ),
                    rule: Some(Box::new(rule.clone())),
                });
            }
            prev.read_only |= read_only;
            return Ok(());
        }
        let rule = match self.rules.iter().position(|r| r.layer == Layer::Session) {
            Some(i) => i as RuleIdx,
            None => {
                self.rules.push(RuleInfo {
                    layer: Layer::Session,
                    location: Location {
                        file: "command line".into(),
                        line: 0,
                    },
                    ..builtin(
                        "session-mounts",
                        Surface::Fs,
                        Action::Allow,
                        "directories given with --mount (and the workspace) for this session",
                    )
                });
                (self.rules.len() - 1) as RuleIdx
            }
        };
        self.fs.mounts.push(Mount {
            host: host.to_path_buf(),
            guest,
            read_only,
            rule,
        });
        Ok(())
    }

    /// The mounts the policy grants, most senior first.
    pub fn mounts(&self) -> Vec<MountView<'_>> {
        self.fs
            .mounts
            .iter()
            .map(|m: &Mount| MountView {
                host: &m.host,
                guest: &m.guest,
                read_only: m.read_only,
                rule: &self.rules[m.rule as usize],
            })
            .collect()
    }

    /// May `secret` be sent to `host`, and if so, how?
    pub fn decide_credential(
        &self,
        secret: &str,
        host: &NetHost,
    ) -> (Decision<'_>, Option<&CredentialGrant>) {
        self.credential_inner(secret, host, false)
    }

    pub fn explain_credential(
        &self,
        secret: &str,
        host: &NetHost,
    ) -> (Decision<'_>, Option<&CredentialGrant>) {
        self.credential_inner(secret, host, true)
    }

    fn credential_inner(
        &self,
        secret: &str,
        host: &NetHost,
        explain: bool,
    ) -> (Decision<'_>, Option<&CredentialGrant>) {
        let mut t = Tally::new(explain);
        self.creds.visit(secret, host, |i| t.see(&self.rules, i));
        // An audit-mode deny lets the request through on the allow's terms.
        let grant_rule = t.allow();
        let what = format!("secret {secret} to {host}");
        let d = t.decide(
            &self.rules,
            self.default_rule(Surface::Credential),
            || format!("no rule allows sending {what}"),
            |r, v| because(r, v, &what),
        );
        let grant = if d.allowed() {
            grant_rule.and_then(|i| self.creds.grant(i))
        } else {
            None
        };
        (d, grant)
    }

    /// Every secret the policy lets the proxy inject.
    pub fn credential_grants(&self) -> impl Iterator<Item = (&CredentialGrant, &RuleInfo)> {
        self.creds
            .grants()
            .map(|g| (g, &self.rules[g.rule as usize]))
    }

    /// May the agent call `tool` on MCP `server` with `args`? Also returns
    /// the calls-per-minute limit of the rule that allowed it.
    pub fn decide_mcp(
        &self,
        server: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> (Decision<'_>, Option<u32>) {
        self.mcp_inner(server, tool, args, false)
    }

    pub fn explain_mcp(
        &self,
        server: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> (Decision<'_>, Option<u32>) {
        self.mcp_inner(server, tool, args, true)
    }

    fn mcp_inner(
        &self,
        server: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
        explain: bool,
    ) -> (Decision<'_>, Option<u32>) {
        let mut t = Tally::new(explain);
        let mismatch = self
            .mcp
            .visit(&self.rules, server, tool, args, |i| t.see(&self.rules, i));
        let rate = t.allow().and_then(|i| self.mcp.calls_per_minute(i));
        let what = format!("{server}.{tool}");
        let default = self.default_rule(Surface::Mcp);
        let mut d = t.decide(
            &self.rules,
            default,
            || format!("no rule allows {what}"),
            |r, v| because(r, v, &what),
        );
        if std::ptr::eq(d.rule, default) {
            if let Some(m) = mismatch {
                let rule = &self.rules[m.rule as usize];
                d.reason = Cow::Owned(format!(
                    "rule `{}` ({} layer, {}) allows {what} but {}",
                    rule.id,
                    rule.layer.as_str(),
                    rule.location,
                    m.message
                ));
            }
        }
        (d, rate)
    }

    /// Whether the rule that decided an MCP request asks for the request's
    /// argument values in the audit log (`log_args = true`), not only their
    /// digest.
    pub fn mcp_logs_args(&self, rule: &RuleInfo) -> bool {
        self.rules
            .iter()
            .position(|r| std::ptr::eq(r, rule))
            .is_some_and(|i| self.mcp.logs_args(i as u32))
    }

    /// Whether the MCP gateway lists `tool` of `server` to the agent: some
    /// allow rule names it and no unconditional enforced deny does. A call
    /// is still decided by [`Policy::decide_mcp`], with its arguments.
    pub fn mcp_listed(&self, server: &str, tool: &str) -> bool {
        self.mcp.listed(&self.rules, server, tool)
    }

    /// May the host ask the guest to run `argv0`?
    pub fn decide_exec(&self, argv0: &str) -> Decision<'_> {
        self.exec_inner(argv0, false)
    }

    pub fn explain_exec(&self, argv0: &str) -> Decision<'_> {
        self.exec_inner(argv0, true)
    }

    fn exec_inner(&self, argv0: &str, explain: bool) -> Decision<'_> {
        let mut t = Tally::new(explain);
        self.exec.visit(argv0, |i| t.see(&self.rules, i));
        let what = format!("running {argv0}");
        t.decide(
            &self.rules,
            self.default_rule(Surface::Exec),
            || format!("no rule allows {what}"),
            |r, v| because(r, v, &what),
        )
    }

    /// May a session have `vcpus` vCPUs and `memory_mib` MiB?
    pub fn decide_limits(&self, vcpus: u64, memory_mib: u64) -> Decision<'_> {
        self.within(
            &[
                (self.limits.vcpus, vcpus, "vCPUs"),
                (self.limits.memory_mib, memory_mib, "MiB of memory"),
            ],
            format!("{vcpus} vCPUs and {memory_mib} MiB are within the limits"),
        )
    }

    /// May a session's own disk be `disk_mib` MiB?
    pub fn decide_disk(&self, disk_mib: u64) -> Decision<'_> {
        self.within(
            &[(self.limits.disk_mib, disk_mib, "MiB of disk")],
            format!("a {disk_mib} MiB disk is within the limits"),
        )
    }

    /// The largest disk a session may have, and the rule that says so.
    pub fn disk_limit(&self) -> Option<(u64, &RuleInfo)> {
        self.limits
            .disk_mib
            .map(|(n, r)| (n, &self.rules[r as usize]))
    }

    /// Denied by the first limit an ask goes over, else allowed (`fine`).
    fn within(&self, asks: &[Ask<'_>], fine: String) -> Decision<'_> {
        let over = asks.iter().find_map(|&(limit, asked, unit)| match limit {
            Some((max, rule)) if asked > max => {
                Some((rule, format!("{asked} {unit} asked, at most {max} allowed")))
            }
            _ => None,
        });
        match over {
            Some((rule, why)) => {
                let rule = &self.rules[rule as usize];
                Decision {
                    verdict: Verdict::Deny,
                    rule,
                    reason: Cow::Owned(format!(
                        "{why} by `{}` ({} layer, {})",
                        rule.id, rule.layer, rule.location
                    )),
                    matched: vec![rule],
                }
            }
            None => Decision {
                verdict: Verdict::Allow,
                rule: &self.within_limits,
                reason: Cow::Owned(fine),
                matched: Vec::new(),
            },
        }
    }

    /// How long a session may live, and the rule that says so.
    pub fn lifetime(&self) -> Option<(Duration, &RuleInfo)> {
        self.limits
            .lifetime
            .map(|(d, r)| (d, &self.rules[r as usize]))
    }

    pub fn limits(&self) -> LimitsView<'_> {
        let view = |l: Option<(u64, u32)>| {
            l.map(|(value, r)| LimitView {
                value,
                rule: &self.rules[r as usize],
            })
        };
        LimitsView {
            vcpus: view(self.limits.vcpus),
            memory_mib: view(self.limits.memory_mib),
            disk_mib: view(self.limits.disk_mib),
            lifetime_secs: view(self.limits.lifetime.map(|(d, r)| (d.as_secs(), r))),
        }
    }
}
