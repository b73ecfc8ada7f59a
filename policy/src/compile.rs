//! Shared steps of turning one parsed file into rules: locations, ids,
//! actions and globs, each failing with the file, line and column.

use std::collections::HashMap;

use globset::{Glob, GlobBuilder, GlobMatcher};
use toml::Spanned;

use crate::format::RuleFields;
use crate::rule::{Action, Layer, Mode, RuleIdx, RuleInfo, Surface};
use crate::{PolicyError, Source};

pub(crate) struct Ctx<'a> {
    pub src: &'a Source,
    pub layer: Layer,
    pub mode: Mode,
    pub rules: &'a mut Vec<RuleInfo>,
    /// Ids used in this file, and the line that used each.
    ids: HashMap<String, usize>,
    counts: HashMap<Surface, usize>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(
        src: &'a Source,
        layer: Layer,
        mode: Mode,
        rules: &'a mut Vec<RuleInfo>,
    ) -> Self {
        Ctx {
            src,
            layer,
            mode,
            rules,
            ids: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    pub(crate) fn err(&self, offset: usize, message: impl Into<String>) -> PolicyError {
        PolicyError::invalid(self.src, offset, message)
    }

    pub(crate) fn action(&self, a: &Spanned<String>) -> Result<Action, PolicyError> {
        match a.get_ref().as_str() {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            other => Err(self.err(
                a.span().start,
                format!("action `{other}` is not \"allow\" or \"deny\""),
            )),
        }
    }

    /// Records a rule and returns its index. `offset` is where its table
    /// starts; rules without an id get `<surface>-<n>`.
    /// Registers the rule a table declares, with the table's id, position
    /// and reason.
    pub(crate) fn table_rule<R: RuleFields>(
        &mut self,
        surface: Surface,
        table: &Spanned<R>,
        action: Action,
        summary: String,
    ) -> Result<RuleIdx, PolicyError> {
        let t = table.get_ref();
        self.rule(
            surface,
            t.id(),
            table.span().start,
            action,
            t.reason().cloned(),
            summary,
        )
    }

    pub(crate) fn rule(
        &mut self,
        surface: Surface,
        id: Option<&Spanned<String>>,
        offset: usize,
        action: Action,
        reason: Option<String>,
        summary: String,
    ) -> Result<RuleIdx, PolicyError> {
        let n = self.counts.entry(surface).or_insert(0);
        *n += 1;
        let (id, id_offset) = match id {
            Some(id) => {
                let s = id.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= 64
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    return Err(self.err(
                        id.span().start,
                        "an id is 1 to 64 letters, digits, `-`, `_` or `.`",
                    ));
                }
                (s.clone(), id.span().start)
            }
            None => (format!("{surface}-{n}"), offset),
        };
        let line = self.src.line_col(offset).0;
        if let Some(prev) = self.ids.insert(id.clone(), line) {
            return Err(self.err(
                id_offset,
                format!("id `{id}` is already used on line {prev}; ids must be unique in a file"),
            ));
        }
        // Audit mode softens deny rules only: grants (mounts) and limits are
        // always what they say.
        let mode = if action == Action::Deny {
            self.mode
        } else {
            Mode::Enforce
        };
        self.rules.push(RuleInfo {
            id,
            surface,
            action,
            layer: self.layer,
            mode,
            location: self.src.location(offset),
            reason,
            summary,
        });
        Ok((self.rules.len() - 1) as RuleIdx)
    }

    /// A glob in which `*` stops at `/` and `**` crosses it.
    pub(crate) fn glob(&self, g: &Spanned<String>) -> Result<GlobMatcher, PolicyError> {
        self.glob_pattern(g).map(|g| g.compile_matcher())
    }

    /// As [`Ctx::glob`], uncompiled, for a [`globset::GlobSet`].
    pub(crate) fn glob_pattern(&self, g: &Spanned<String>) -> Result<Glob, PolicyError> {
        GlobBuilder::new(g.get_ref())
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| self.err(g.span().start, format!("bad glob: {}", e.kind())))
    }

    /// A rule's non-empty `hosts` list, each parsed as a host pattern.
    pub(crate) fn host_patterns(
        &self,
        hosts: &[Spanned<String>],
        table_offset: usize,
    ) -> Result<Vec<crate::host::HostPattern>, PolicyError> {
        self.non_empty(hosts, table_offset, "hosts")?;
        hosts
            .iter()
            .map(|h| {
                crate::host::HostPattern::parse(h.get_ref())
                    .map_err(|e| self.err(h.span().start, e.to_string()))
            })
            .collect()
    }

    pub(crate) fn non_empty<T>(
        &self,
        list: &[T],
        offset: usize,
        what: &str,
    ) -> Result<(), PolicyError> {
        if list.is_empty() {
            Err(self.err(
                offset,
                format!("`{what}` is empty: a rule that matches nothing is a mistake"),
            ))
        } else {
            Ok(())
        }
    }
}
