//! Exec rules: which programs the host will ask the guest agent to run.

use globset::GlobMatcher;
use toml::Spanned;

use crate::compile::Ctx;
use crate::format::RawExecRule;
use crate::rule::{RuleIdx, Surface};
use crate::PolicyError;

struct ExecRule {
    rule: RuleIdx,
    /// Globs with a `/` match the whole argv[0]; others its file name.
    commands: Vec<(bool, GlobMatcher)>,
}

#[derive(Default)]
pub(crate) struct ExecRules {
    rules: Vec<ExecRule>,
}

impl ExecRules {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawExecRule>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        ctx.non_empty(&r.commands, raw.span().start, "commands")?;
        let mut commands = Vec::new();
        for c in &r.commands {
            commands.push((c.get_ref().contains('/'), ctx.glob(c)?));
        }
        let list: Vec<&str> = r.commands.iter().map(|c| c.get_ref().as_str()).collect();
        let summary = format!("{} exec of {}", action.as_str(), list.join(", "));
        let rule = ctx.table_rule(Surface::Exec, raw, action, summary)?;
        self.rules.push(ExecRule { rule, commands });
        Ok(())
    }

    pub(crate) fn visit(&self, argv0: &str, mut seen: impl FnMut(RuleIdx)) {
        let base = argv0.rsplit('/').next().unwrap_or(argv0);
        for r in &self.rules {
            if r.commands
                .iter()
                .any(|(full, g)| g.is_match(if *full { argv0 } else { base }))
            {
                seen(r.rule);
            }
        }
    }
}
