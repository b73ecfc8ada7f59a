//! Network rules: which hosts, addresses and ports the guest may reach.
//! Indexed so that a decision costs a few hash lookups however many rules
//! there are.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::compile::Ctx;
use crate::format::RawNetRule;
use crate::host::{mask_v4, mask_v6, normalize_host, Cidr, HostError, HostPattern, NetHost};
use crate::rule::{Action, RuleIdx, Surface};
use crate::PolicyError;

/// Inclusive port ranges; empty means every port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    fn contains(&self, port: u16) -> bool {
        self.0.is_empty() || self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Clone, Debug)]
struct Entry {
    rule: RuleIdx,
    ports: PortSet,
}

/// One `to` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Dest {
    Host(HostPattern),
    Net(Cidr),
}

/// Splits `host:port`, `[v6]:port`, a bare IPv6 address or a bare host
/// into the host (brackets kept) and the port, if there is one.
fn split_host_port(input: &str) -> Result<(&str, Option<u16>), HostError> {
    let err = |why: &str| HostError {
        input: input.to_string(),
        why: why.to_string(),
    };
    let s = input.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| err("an IPv6 address opened with `[` must end with `]`"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| err("expected `:PORT` after `]`"))?,
            ),
        };
        (&s[..inner.len() + 2], port)
    } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
        (s, None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("the port must be a number from 1 to 65535"))?,
        ),
    };
    Ok((host, port))
}

/// Parses a connection target, `host:port`, `10.0.0.1:80` or `[::1]:443`.
pub fn parse_host_port(input: &str) -> Result<(NetHost, u16), HostError> {
    let (host, port) = split_host_port(input)?;
    let Some(port) = port else {
        let why = if host.contains(':') && !host.starts_with('[') {
            "write IPv6 addresses in brackets: [::1]:443"
        } else {
            "expected HOST:PORT, such as example.com:443 or [::1]:80"
        };
        return Err(HostError {
            input: input.to_string(),
            why: why.to_string(),
        });
    };
    Ok((normalize_host(host)?, port))
}

/// Parses `host`, `*.host`, `**.host`, `host:port`, `10.0.0.1`, `[::1]:443`,
/// `10.0.0.0/8` or `*`.
pub(crate) fn parse_dest(input: &str) -> Result<(Dest, Option<u16>), HostError> {
    let s = input.trim();
    if s.contains('/') {
        return Ok((Dest::Net(Cidr::parse(s)?), None));
    }
    let (host, port) = split_host_port(input)?;
    if !host.contains('*') {
        if let Ok(NetHost::Ip(ip)) = normalize_host(host) {
            return Ok((Dest::Net(Cidr::host(ip)), port));
        }
    }
    Ok((Dest::Host(HostPattern::parse(host)?), port))
}

fn parse_ports(ctx: &Ctx, raw: &[toml::Spanned<toml::Value>]) -> Result<PortSet, PolicyError> {
    let mut set = Vec::new();
    for v in raw {
        let bad = || {
            ctx.err(
                v.span().start,
                "a port is a number from 1 to 65535 or a range such as \"8000-8999\"",
            )
        };
        let one = |n: i64| u16::try_from(n).ok().filter(|p| *p != 0);
        let range = match v.get_ref() {
            toml::Value::Integer(n) => one(*n).map(|p| (p, p)),
            toml::Value::String(s) => match s.split_once('-') {
                Some((a, b)) => match (
                    a.trim().parse().ok().and_then(one),
                    b.trim().parse().ok().and_then(one),
                ) {
                    (Some(a), Some(b)) if a <= b => Some((a, b)),
                    _ => None,
                },
                None => s.trim().parse().ok().and_then(one).map(|p| (p, p)),
            },
            _ => None,
        };
        set.push(range.ok_or_else(bad)?);
    }
    Ok(PortSet(set))
}

/// The compiled network rules of a whole policy.
#[derive(Default)]
pub(crate) struct NetRules {
    exact: HashMap<String, Vec<Entry>>,
    one_label: HashMap<String, Vec<Entry>>,
    any_depth: HashMap<String, Vec<Entry>>,
    any: Vec<Entry>,
    /// Networks grouped by prefix length: one lookup per distinct length.
    v4: Vec<(u8, HashMap<u32, Vec<Entry>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<Entry>>)>,
    /// Destinations of allow rules with `intercept = false`: the proxy only
    /// tunnels to them, never terminates their TLS.
    passthrough: Vec<Dest>,
}

fn by_prefix<K: std::hash::Hash + Eq>(
    groups: &mut Vec<(u8, HashMap<K, Vec<Entry>>)>,
    prefix: u8,
    key: K,
    entry: Entry,
) {
    let pos = match groups.iter().position(|(p, _)| *p == prefix) {
        Some(i) => i,
        None => {
            groups.push((prefix, HashMap::new()));
            groups.len() - 1
        }
    };
    groups[pos].1.entry(key).or_default().push(entry);
}

impl NetRules {
    pub(crate) fn add(
        &mut self,
        ctx: &mut Ctx,
        raw: &toml::Spanned<RawNetRule>,
    ) -> Result<(), PolicyError> {
        let r = raw.get_ref();
        let action = ctx.action(&r.action)?;
        if r.to.is_empty() {
            return Err(ctx.err(
                raw.span().start,
                "`to` is empty: list hosts, patterns or networks, or \"*\" for every destination",
            ));
        }
        let ports = parse_ports(ctx, &r.ports)?;
        let intercept = match &r.intercept {
            Some(i) if !*i.get_ref() && action == Action::Deny => {
                return Err(ctx.err(
                    i.span().start,
                    "`intercept` is for allow rules: a denied connection is never made",
                ))
            }
            Some(i) => *i.get_ref(),
            None => true,
        };
        let mut dests = Vec::new();
        for t in &r.to {
            let (dest, port) =
                parse_dest(t.get_ref()).map_err(|e| ctx.err(t.span().start, e.to_string()))?;
            let ports = match (port, ports.0.is_empty()) {
                (Some(p), true) => PortSet(vec![(p, p)]),
                (Some(_), false) => {
                    return Err(ctx.err(
                        t.span().start,
                        "this destination names a port and the rule has `ports`: give the port in one place",
                    ))
                }
                (None, _) => ports.clone(),
            };
            dests.push((dest, ports));
        }
        let summary = dests
            .iter()
            .map(|(d, p)| {
                let d = match d {
                    Dest::Host(h) => h.to_string(),
                    Dest::Net(c) if c.prefix == 32 || c.prefix == 128 => {
                        NetHost::Ip(c.addr).to_string()
                    }
                    Dest::Net(c) => c.to_string(),
                };
                if p.0.is_empty() {
                    d
                } else {
                    format!("{d} port {}", p.describe())
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let rule = ctx.table_rule(
            Surface::Net,
            raw,
            action,
            format!(
                "{} {summary}{}",
                action.as_str(),
                if intercept {
                    ""
                } else {
                    " (never intercepted)"
                }
            ),
        )?;
        for (dest, ports) in dests {
            if !intercept {
                self.passthrough.push(dest.clone());
            }
            let entry = Entry { rule, ports };
            match dest {
                Dest::Host(HostPattern::Any) => self.any.push(entry),
                Dest::Host(HostPattern::Exact(h)) => self.exact.entry(h).or_default().push(entry),
                Dest::Host(HostPattern::OneLabel(h)) => {
                    self.one_label.entry(h).or_default().push(entry)
                }
                Dest::Host(HostPattern::AnyDepth(h)) => {
                    self.any_depth.entry(h).or_default().push(entry)
                }
                Dest::Net(c) => match c.addr {
                    IpAddr::V4(a) => by_prefix(&mut self.v4, c.prefix, u32::from(a), entry),
                    IpAddr::V6(a) => by_prefix(&mut self.v6, c.prefix, u128::from(a), entry),
                },
            }
        }
        Ok(())
    }

    /// Whether an allow rule with `intercept = false` covers `host`.
    pub(crate) fn passthrough(&self, host: &NetHost) -> bool {
        self.passthrough.iter().any(|d| match (d, host) {
            (Dest::Host(p), _) => p.covers(host),
            (Dest::Net(c), NetHost::Ip(ip)) => c.contains(*ip),
            (Dest::Net(_), NetHost::Name(_)) => false,
        })
    }

    /// Calls `seen` with every address or network rule that covers `ip` on
    /// `port` (not `*`: that names no address).
    pub(crate) fn visit_addr(&self, ip: IpAddr, port: u16, mut seen: impl FnMut(RuleIdx)) {
        let mut hits = |entries: Option<&Vec<Entry>>| {
            for e in entries.into_iter().flatten() {
                if e.ports.contains(port) {
                    seen(e.rule);
                }
            }
        };
        match crate::host::canonical_ip(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for (prefix, map) in &self.v4 {
                    hits(map.get(&mask_v4(a, *prefix)));
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for (prefix, map) in &self.v6 {
                    hits(map.get(&mask_v6(a, *prefix)));
                }
            }
        }
    }

    /// Calls `seen` with every rule that matches a connection to `host` (and
    /// to `addr`, the address it resolved to, if known) on `port`.
    pub(crate) fn visit(
        &self,
        host: &NetHost,
        addr: Option<IpAddr>,
        port: u16,
        mut seen: impl FnMut(RuleIdx),
    ) {
        let mut hits = |entries: Option<&Vec<Entry>>| {
            for e in entries.into_iter().flatten() {
                if e.ports.contains(port) {
                    seen(e.rule);
                }
            }
        };
        hits(Some(&self.any));
        let ip = match host {
            NetHost::Name(name) => {
                hits(self.exact.get(name.as_str()));
                if let Some((_, parent)) = name.split_once('.') {
                    hits(self.one_label.get(parent));
                }
                let mut rest = name.as_str();
                while let Some((_, parent)) = rest.split_once('.') {
                    hits(self.any_depth.get(parent));
                    rest = parent;
                }
                addr
            }
            NetHost::Ip(ip) => Some(*ip),
        };
        if let Some(ip) = ip {
            self.visit_addr(ip, port, &mut seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_host_port("A.com.:443").unwrap(),
            (NetHost::Name("a.com".into()), 443)
        );
        assert_eq!(
            parse_host_port("[::1]:80").unwrap(),
            (NetHost::Ip("::1".parse().unwrap()), 80)
        );
        for bad in ["a.com", "a.com:0", "::1:80", "[::1]", ":80", "a.com:http"] {
            assert!(parse_host_port(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn destinations() {
        let host = |s: &str| parse_dest(s).unwrap();
        assert_eq!(
            host("a.com:443"),
            (Dest::Host(HostPattern::Exact("a.com".into())), Some(443))
        );
        assert_eq!(
            host("[::1]:22"),
            (Dest::Net(Cidr::host("::1".parse().unwrap())), Some(22))
        );
        assert_eq!(
            host("::1"),
            (Dest::Net(Cidr::host("::1".parse().unwrap())), None)
        );
        assert_eq!(
            host("127.1"),
            (Dest::Net(Cidr::host("127.0.0.1".parse().unwrap())), None)
        );
        assert_eq!(host("*"), (Dest::Host(HostPattern::Any), None));
        for bad in [
            "a.com:0",
            "a.com:99999",
            "a.com:x",
            "[::1]x",
            "[::1",
            "a*.com",
            "10.0.0.0/8:80",
        ] {
            assert!(parse_dest(bad).is_err(), "{bad:?} accepted");
        }
    }
}
