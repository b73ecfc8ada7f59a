//! Rules, layers and decisions: the vocabulary every surface shares.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;

use crate::Location;

/// Who wrote a rule set. Earlier layers are more senior: when several deny
/// rules match, the most senior one is reported, and limits take the lowest
/// value any layer sets.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    Org,
    Team,
    Project,
    /// Given on the sbx command line for one session (`sbx start --mount`).
    Session,
    /// The built-in preset the policy starts from.
    Preset,
    /// sbx's own rules, such as the default deny.
    Builtin,
}

impl Layer {
    pub fn parse(s: &str) -> Option<Layer> {
        match s {
            "org" => Some(Layer::Org),
            "team" => Some(Layer::Team),
            "project" => Some(Layer::Project),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Org => "org",
            Layer::Team => "team",
            Layer::Project => "project",
            Layer::Session => "session",
            Layer::Preset => "preset",
            Layer::Builtin => "builtin",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a rule set's denials take effect (`enforce`) or are only
/// recorded (`audit`), for rolling out new rules.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What a decision is about.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Surface {
    Fs,
    Net,
    /// Requests on hosts whose HTTP the egress proxy reads.
    Http,
    Credential,
    Mcp,
    Exec,
    Limits,
}

impl Surface {
    pub const ALL: [Surface; 7] = [
        Surface::Fs,
        Surface::Net,
        Surface::Http,
        Surface::Credential,
        Surface::Mcp,
        Surface::Exec,
        Surface::Limits,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Fs => "fs",
            Surface::Net => "net",
            Surface::Http => "http",
            Surface::Credential => "credential",
            Surface::Mcp => "mcp",
            Surface::Exec => "exec",
            Surface::Limits => "limits",
        }
    }
}

impl fmt::Display for Surface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule as written, with where it came from.
#[derive(Clone, Debug, Serialize)]
pub struct RuleInfo {
    pub id: String,
    pub surface: Surface,
    pub action: Action,
    pub layer: Layer,
    pub mode: Mode,
    pub location: Location,
    /// The rule's own `reason`, if it gave one.
    pub reason: Option<String>,
    /// What the rule matches, in one line, for `sbx policy show`.
    pub summary: String,
}

/// Index of a rule in its policy. Rules are stored most senior first, so a
/// smaller index always wins a tie.
pub(crate) type RuleIdx = u32;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The answer to one question put to the policy.
#[derive(Clone, Debug)]
pub struct Decision<'p> {
    /// What the rules say.
    pub verdict: Verdict,
    /// The rule that decided. For a denial in audit mode, the rule that
    /// would have denied.
    pub rule: &'p RuleInfo,
    pub reason: Cow<'p, str>,
    /// Every rule that matched, most senior first; filled only by `explain`.
    pub matched: Vec<&'p RuleInfo>,
}

impl Decision<'_> {
    /// Whether the action may go ahead: an allow, or a denial by a rule set
    /// in audit mode.
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow || self.rule.mode == Mode::Audit
    }

    pub fn mode(&self) -> Mode {
        self.rule.mode
    }

    /// "allow", "deny", or "audit-deny" for a denial that was only recorded.
    pub fn outcome(&self) -> &'static str {
        match (self.verdict, self.rule.mode) {
            (Verdict::Allow, _) => "allow",
            (Verdict::Deny, Mode::Enforce) => "deny",
            (Verdict::Deny, Mode::Audit) => "audit-deny",
        }
    }
}

/// Collects the rules that match a request and applies deny-wins:
/// an enforced deny beats everything, then allows, then the default deny.
/// A deny in audit mode is reported only when something allowed the request
/// (otherwise the default deny, which is always enforced, stands).
pub(crate) struct Tally {
    enforce_deny: Option<RuleIdx>,
    audit_deny: Option<RuleIdx>,
    allow: Option<RuleIdx>,
    matched: Option<Vec<RuleIdx>>,
}

fn keep_min(slot: &mut Option<RuleIdx>, idx: RuleIdx) {
    match slot {
        Some(cur) if *cur <= idx => {}
        _ => *slot = Some(idx),
    }
}

impl Tally {
    pub(crate) fn new(explain: bool) -> Self {
        Tally {
            enforce_deny: None,
            audit_deny: None,
            allow: None,
            matched: explain.then(Vec::new),
        }
    }

    pub(crate) fn see(&mut self, rules: &[RuleInfo], idx: RuleIdx) {
        let rule = &rules[idx as usize];
        match (rule.action, rule.mode) {
            (Action::Deny, Mode::Enforce) => keep_min(&mut self.enforce_deny, idx),
            (Action::Deny, Mode::Audit) => keep_min(&mut self.audit_deny, idx),
            (Action::Allow, _) => keep_min(&mut self.allow, idx),
        }
        if let Some(m) = &mut self.matched {
            m.push(idx);
        }
    }

    /// Whether an enforced deny matched.
    pub(crate) fn enforced_deny(&self) -> bool {
        self.enforce_deny.is_some()
    }

    /// The most senior allow rule that matched, whatever the verdict.
    pub(crate) fn allow(&self) -> Option<RuleIdx> {
        self.allow
    }

    /// The deciding rule and verdict, or None when nothing matched.
    pub(crate) fn winner(&self) -> Option<(RuleIdx, Verdict)> {
        if let Some(i) = self.enforce_deny {
            return Some((i, Verdict::Deny));
        }
        let allow = self.allow?;
        Some(match self.audit_deny {
            Some(i) => (i, Verdict::Deny),
            None => (allow, Verdict::Allow),
        })
    }

    pub(crate) fn matched<'p>(&self, rules: &'p [RuleInfo]) -> Vec<&'p RuleInfo> {
        let mut m = self.matched.clone().unwrap_or_default();
        m.sort_unstable();
        m.dedup();
        m.into_iter().map(|i| &rules[i as usize]).collect()
    }

    /// Turns the tally into a decision; `default` decides when no rule matched.
    pub(crate) fn decide<'p>(
        self,
        rules: &'p [RuleInfo],
        default: &'p RuleInfo,
        default_reason: impl FnOnce() -> String,
        describe: impl FnOnce(&'p RuleInfo, Verdict) -> String,
    ) -> Decision<'p> {
        let matched = self.matched(rules);
        match self.winner() {
            Some((idx, verdict)) => {
                let rule = &rules[idx as usize];
                let reason = match &rule.reason {
                    Some(r) => Cow::Borrowed(r.as_str()),
                    None => Cow::Owned(describe(rule, verdict)),
                };
                Decision {
                    verdict,
                    rule,
                    reason,
                    matched,
                }
            }
            None => Decision {
                verdict: Verdict::Deny,
                rule: default,
                reason: Cow::Owned(default_reason()),
                matched,
            },
        }
    }
}
