//! Delegation: which kinds of allow rules the organisation lets team and
//! local policy add. An org policy's `[delegate]` table names them:
//!
//! ```toml
//! [delegate]
//! team = ["network", "http", "mcp", "credential"]
//! local = ["network"]     # project files, templates: network allows only
//! ```
//!
//! A kind left out may still be denied below (a deny only narrows), but an
//! allow of it is an error naming the rule and the org's table: loading
//! fails, so the session does not start on a policy the org did not
//! sanction. Without `[delegate]`, or without one of its keys, that layer
//! may add anything (what sbx did before delegation).
//!
//! "Team" is the team layer as the control plane serves it, signed with
//! the org's key; once keys are trusted, an unsigned file that says
//! `layer = "team"` counts as local.

use serde::Serialize;

use crate::format::RawFile;
use crate::{Location, PolicyError, Source};

/// The kinds of rule, as their tables are named in a policy file.
pub const KINDS: [&str; 7] = [
    "mount",
    "fs",
    "network",
    "http",
    "credential",
    "mcp",
    "exec",
];

/// Who a lower-layer file speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Audience {
    Team,
    Local,
}

impl Audience {
    fn as_str(self) -> &'static str {
        match self {
            Audience::Team => "team",
            Audience::Local => "local",
        }
    }
}

/// What one audience may add, and where the org said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub kinds: Vec<String>,
    pub location: Location,
}

/// What the org delegates; None: that audience may add anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Delegation {
    pub team: Option<Grant>,
    pub local: Option<Grant>,
}

impl Delegation {
    /// Adds an org file's `[delegate]` table. Several org files narrow each
    /// other: a kind must be delegated by all of them.
    pub(crate) fn add(&mut self, src: &Source, raw: &RawFile) -> Result<(), PolicyError> {
        let Some(d) = &raw.delegate else {
            return Ok(());
        };
        let d = d.get_ref();
        for (slot, list) in [(&mut self.team, &d.team), (&mut self.local, &d.local)] {
            let Some(list) = list else {
                continue;
            };
            let mut kinds = Vec::new();
            for k in list.get_ref() {
                if !KINDS.contains(&k.get_ref().as_str()) {
                    return Err(PolicyError::invalid(
                        src,
                        k.span().start,
                        format!(
                            "`{}` is not a kind of rule: delegate any of {}",
                            k.get_ref(),
                            KINDS.join(", ")
                        ),
                    ));
                }
                kinds.push(k.get_ref().clone());
            }
            let grant = Grant {
                kinds,
                location: src.location(list.span().start),
            };
            *slot = Some(match slot.take() {
                None => grant,
                Some(before) => Grant {
                    kinds: before
                        .kinds
                        .into_iter()
                        .filter(|k| grant.kinds.contains(k))
                        .collect(),
                    location: grant.location,
                },
            });
        }
        Ok(())
    }

    /// Refuses the allow rules in `raw` that the org did not delegate to
    /// `audience`, naming the first.
    pub(crate) fn check(
        &self,
        src: &Source,
        raw: &RawFile,
        audience: Audience,
    ) -> Result<(), PolicyError> {
        let grant = match audience {
            Audience::Team => &self.team,
            Audience::Local => &self.local,
        };
        let Some(grant) = grant else {
            return Ok(());
        };
        for (kind, at) in allows(raw) {
            if grant.kinds.iter().any(|k| k == kind) {
                continue;
            }
            let who = audience.as_str();
            let granted = match grant.kinds.as_slice() {
                [] => "nothing".to_string(),
                k => format!("only {}", k.join(", ")),
            };
            return Err(PolicyError::invalid(
                src,
                at,
                format!(
                    "{who} policy may not allow `{kind}`: the org policy ({}) delegates {granted} to {who} policy; \
                     ask the org's admins to delegate `{kind}` or to allow this themselves, or make this rule a deny",
                    grant.location
                ),
            ));
        }
        Ok(())
    }
}

/// Every allow rule of a file: its kind and where its table starts.
fn allows(raw: &RawFile) -> Vec<(&'static str, usize)> {
    /// The tables of one kind whose `action` is allow.
    fn of<'a, T>(
        kind: &'static str,
        tables: &'a [toml::Spanned<T>],
        action: fn(&T) -> &toml::Spanned<String>,
    ) -> impl Iterator<Item = (&'static str, usize)> + 'a {
        tables
            .iter()
            .filter(move |t| action(t.get_ref()).get_ref() == "allow")
            .map(move |t| (kind, t.span().start))
    }
    // Every mount is a grant.
    let mut out: Vec<(&'static str, usize)> = raw
        .mount
        .iter()
        .map(|t| ("mount", t.span().start))
        .collect();
    out.extend(of("fs", &raw.fs, |t| &t.action));
    out.extend(of("network", &raw.network, |t| &t.action));
    out.extend(of("http", &raw.http, |t| &t.action));
    out.extend(of("credential", &raw.credential, |t| &t.action));
    out.extend(of("mcp", &raw.mcp, |t| &t.action));
    out.extend(of("exec", &raw.exec, |t| &t.action));
    out.sort_by_key(|(_, at)| *at);
    out
}
