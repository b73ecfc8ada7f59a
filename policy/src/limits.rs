//! Resource limits. Every layer may lower a limit; none may raise one that
//! a more senior layer set, so the effective limit is the lowest.

use std::time::Duration;

use toml::Spanned;

use crate::compile::Ctx;
use crate::format::RawLimits;
use crate::rule::{Action, RuleIdx, Surface};
use crate::PolicyError;

#[derive(Default)]
pub(crate) struct Limits {
    pub vcpus: Option<(u64, RuleIdx)>,
    pub memory_mib: Option<(u64, RuleIdx)>,
    /// A session's own disk (the writable layer over an image).
    pub disk_mib: Option<(u64, RuleIdx)>,
    pub lifetime: Option<(Duration, RuleIdx)>,
}

/// `90s`, `30m`, `8h`, `2d`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(mult)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

fn lower<T: PartialOrd + Copy>(slot: &mut Option<(T, RuleIdx)>, value: T, rule: RuleIdx) {
    match slot {
        Some((cur, _)) if *cur <= value => {}
        _ => *slot = Some((value, rule)),
    }
}

impl Limits {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &Spanned<RawLimits>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let mut number = |v: &Spanned<i64>,
                          id: &str,
                          min: i64,
                          max: i64,
                          unit: &str|
         -> Result<(u64, RuleIdx), PolicyError> {
            let n = *v.get_ref();
            if !(min..=max).contains(&n) {
                return Err(ctx.err(v.span().start, format!("{id} must be from {min} to {max}")));
            }
            let rule = limit_rule(ctx, v.span(), id, format!("at most {n} {unit}"))?;
            Ok((n as u64, rule))
        };
        if let Some(v) = &r.vcpus {
            let (n, rule) = number(v, "vcpus", 1, 254, "vCPUs")?;
            lower(&mut self.vcpus, n, rule);
        }
        if let Some(v) = &r.memory_mib {
            let (n, rule) = number(v, "memory_mib", 64, 1 << 20, "MiB of memory")?;
            lower(&mut self.memory_mib, n, rule);
        }
        if let Some(v) = &r.disk_mib {
            let (n, rule) = number(v, "disk_mib", 64, 1 << 30, "MiB of disk")?;
            lower(&mut self.disk_mib, n, rule);
        }
        if let Some(v) = &r.lifetime {
            let d = parse_duration(v.get_ref()).ok_or_else(|| {
                ctx.err(
                    v.span().start,
                    "a lifetime is a number with s, m, h or d, such as \"8h\"",
                )
            })?;
            let rule = limit_rule(
                ctx,
                v.span(),
                "lifetime",
                format!("sessions end after {}", v.get_ref()),
            )?;
            lower(&mut self.lifetime, d, rule);
        }
        Ok(())
    }
}

/// A limit is a deny rule named `limits.<key>`, placed at its value.
fn limit_rule(
    ctx: &mut Ctx,
    span: std::ops::Range<usize>,
    key: &str,
    summary: String,
) -> Result<RuleIdx, PolicyError> {
    let start = span.start;
    let name = Spanned::new(span, format!("limits.{key}"));
    ctx.rule(
        Surface::Limits,
        Some(&name),
        start,
        Action::Deny,
        None,
        summary,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("8h"), Some(Duration::from_secs(8 * 3600)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        for bad in ["", "h", "0", "5w", "-1h", "99999999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
