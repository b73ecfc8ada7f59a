//! Host names, host patterns and address ranges, normalised so that one
//! host has one spelling: lower case, no trailing dot, IDN as punycode, and
//! every numeric IPv4 form (`127.1`, `0x7f.0.0.1`) read as the address it is.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A connection target as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetHost {
    /// A normalised domain name.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for NetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetHost::Name(n) => f.write_str(n),
            NetHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            NetHost::Ip(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a valid host: {why}")]
pub struct HostError {
    pub input: String,
    pub why: String,
}

fn host_error(input: &str, why: impl Into<String>) -> HostError {
    HostError {
        input: input.to_string(),
        why: why.into(),
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are the IPv4 address they
/// carry: otherwise a v4 deny could be dodged by writing the address as v6.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Normalises a host as a client would resolve it.
pub fn normalize_host(input: &str) -> Result<NetHost, HostError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(host_error(input, "it is empty"));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            host_error(input, "an IPv6 address opened with `[` must end with `]`")
        })?;
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| host_error(input, "not an IPv6 address"))?;
        return Ok(NetHost::Ip(canonical_ip(IpAddr::V6(ip))));
    }
    if let Ok(ip) = s.parse::<Ipv6Addr>() {
        return Ok(NetHost::Ip(canonical_ip(IpAddr::V6(ip))));
    }
    // One trailing dot names the same host (the DNS root); more is an error.
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    if trimmed.is_empty() || trimmed.ends_with('.') {
        return Err(host_error(input, "it has an empty label"));
    }
    match url::Host::parse(trimmed) {
        Ok(url::Host::Domain(d)) => {
            if d.split('.').any(str::is_empty) {
                return Err(host_error(input, "it has an empty label"));
            }
            if d.len() > 253 || d.split('.').any(|l| l.len() > 63) {
                return Err(host_error(
                    input,
                    "names are at most 253 characters, labels 63",
                ));
            }
            Ok(NetHost::Name(d))
        }
        Ok(url::Host::Ipv4(ip)) => Ok(NetHost::Ip(IpAddr::V4(ip))),
        Ok(url::Host::Ipv6(ip)) => Ok(NetHost::Ip(canonical_ip(IpAddr::V6(ip)))),
        Err(e) => Err(host_error(input, e.to_string())),
    }
}

/// Which host names a rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host and address.
    Any,
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`: exactly one label in front of the suffix.
    OneLabel(String),
    /// `**.example.com`: one or more labels in front of the suffix.
    AnyDepth(String),
}

impl HostPattern {
    pub fn parse(input: &str) -> Result<HostPattern, HostError> {
        let s = input.trim();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        let (make, rest): (fn(String) -> HostPattern, &str) =
            if let Some(rest) = s.strip_prefix("**.") {
                (HostPattern::AnyDepth, rest)
            } else if let Some(rest) = s.strip_prefix("*.") {
                (HostPattern::OneLabel, rest)
            } else {
                (HostPattern::Exact, s)
            };
        if rest.contains('*') {
            return Err(host_error(
                input,
                "a wildcard must be a whole leading label: `*.example.com` (one label) or `**.example.com` (any depth)",
            ));
        }
        match normalize_host(rest)? {
            NetHost::Name(n) => Ok(make(n)),
            NetHost::Ip(_) => Err(host_error(
                input,
                "an address is not a host name; write addresses as `10.0.0.1` or `10.0.0.0/8` without wildcards",
            )),
        }
    }

    /// Whether a connection target matches: names by pattern; an IP
    /// address only by `*` (addresses are for address rules).
    pub fn covers(&self, host: &NetHost) -> bool {
        match host {
            NetHost::Name(n) => self.matches(n),
            NetHost::Ip(_) => *self == HostPattern::Any,
        }
    }

    /// Matches a normalised name.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(e) => e == name,
            HostPattern::OneLabel(suffix) => {
                name.split_once('.').is_some_and(|(_, rest)| rest == suffix)
            }
            HostPattern::AnyDepth(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(e) => f.write_str(e),
            HostPattern::OneLabel(s) => write!(f, "*.{s}"),
            HostPattern::AnyDepth(s) => write!(f, "**.{s}"),
        }
    }
}

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn host(ip: IpAddr) -> Cidr {
        let ip = canonical_ip(ip);
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Cidr { addr: ip, prefix }
    }

    pub fn parse(input: &str) -> Result<Cidr, HostError> {
        let (addr, prefix) = input
            .trim()
            .split_once('/')
            .ok_or_else(|| host_error(input, "a network is written ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| host_error(input, "the part before `/` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| host_error(input, format!("the prefix must be 0 to {max}")))?;
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(host_error(
                input,
                format!(
                    "bits are set past the prefix; did you mean {}/{prefix}?",
                    cidr.network()
                ),
            ));
        }
        // A v4-mapped network is the v4 network it maps.
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Ok(Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(cidr)
    }

    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), self.prefix))),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask_v4(u32::from(a), self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => mask_v6(u128::from(a), self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub(crate) fn mask_v4(a: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(prefix)))
    }
}

pub(crate) fn mask_v6(a: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(prefix)))
    }
}

/// The IPv4 address an IPv6 address carries, in the forms that carry one
/// (IPv4-mapped addresses are IPv4 already, see [`canonical_ip`]): where a
/// host has a translator or tunnel, connecting to the IPv6 form reaches the
/// IPv4 address, so the IPv6 form is judged as that address.
fn carried_ipv4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        // IPv4-compatible, `::a.b.c.d` (deprecated; `::` and `::1` are not).
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => Some(v4(hi, lo)),
        // IPv4-translated (SIIT), `::ffff:0:a.b.c.d`.
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        // NAT64's well-known prefix, `64:ff9b::a.b.c.d`.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        // 6to4, `2002:AABB:CCDD::/48`.
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        // Teredo, `2001:0:SERVER:FLAGS:PORT:CLIENT`: the client (where the
        // packets go) is stored with every bit inverted.
        [0x2001, 0, _, _, _, _, hi, lo] => Some(v4(!hi, !lo)),
        _ => None,
    }
}

/// What kind of non-public address `ip` is, or None for a public one. The
/// egress proxy refuses these unless an address rule names them: a name that
/// resolves to one is how DNS rebinding reaches the host and its LAN.
pub fn address_class(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a == Ipv4Addr::new(169, 254, 169, 254) || a == Ipv4Addr::new(100, 100, 100, 200) {
                Some("a cloud metadata address")
            } else if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_private() {
                Some("a private address")
            } else if a.is_link_local() {
                Some("a link-local address")
            } else if a.is_unspecified() || o[0] == 0 {
                Some("an unspecified address")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("a carrier-grade NAT address")
            } else if a.is_multicast() || a.is_broadcast() || o[0] >= 240 {
                Some("a multicast or reserved address")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("a cloud metadata address")
            } else if a.is_loopback() {
                Some("a loopback address")
            } else if a.is_unspecified() {
                Some("an unspecified address")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("a unique local (private) address")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("a link-local address")
            } else if a.is_multicast() {
                Some("a multicast address")
            } else if let Some(v4) = carried_ipv4(a) {
                address_class(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        match normalize_host(s).unwrap() {
            NetHost::Name(n) => n,
            other => panic!("{s} normalised to {other:?}"),
        }
    }

    #[test]
    fn ipv6_forms_are_judged_by_the_ipv4_address_they_carry() {
        let class = |s: &str| address_class(s.parse().unwrap());
        for (addr, want) in [
            ("::127.0.0.1", Some("a loopback address")),
            ("::10.1.2.3", Some("a private address")),
            ("::ffff:0:127.0.0.1", Some("a loopback address")),
            ("::ffff:0:169.254.169.254", Some("a cloud metadata address")),
            ("64:ff9b::192.168.1.1", Some("a private address")),
            ("2002:7f00:1::", Some("a loopback address")),
            ("2002:a00:1:5::1", Some("a private address")),
            // Teredo: client 10.0.0.1 stored inverted (f5ff:fffe).
            (
                "2001:0:4136:e378:8000:63bf:f5ff:fffe",
                Some("a private address"),
            ),
            // The same forms carrying a public address are public.
            ("::ffff:0:8.8.8.8", None),
            ("2002:808:808::1", None),
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
            ("64:ff9b::8.8.4.4", None),
            // `::1` and `::` stay what they are.
            ("::1", Some("a loopback address")),
            ("::", Some("an unspecified address")),
            ("2606:4700::1111", None),
        ] {
            assert_eq!(class(addr), want, "{addr}");
        }
    }

    #[test]
    fn normalisation() {
        assert_eq!(name("Example.COM."), "example.com");
        assert_eq!(name("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(name("XN--BCHER-KVA.example"), "xn--bcher-kva.example");
        assert_eq!(
            normalize_host("127.1").unwrap(),
            NetHost::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            normalize_host("0x7f.0.0.1").unwrap(),
            NetHost::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            normalize_host("[::ffff:10.1.2.3]").unwrap(),
            NetHost::Ip("10.1.2.3".parse().unwrap())
        );
        for bad in ["", ".", "a..b", "a.b..", "exa mple.com", "[::1", "a/b"] {
            assert!(normalize_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wildcards() {
        let one = HostPattern::parse("*.a.com").unwrap();
        let any = HostPattern::parse("**.a.com").unwrap();
        assert!(one.matches("x.a.com"));
        assert!(!one.matches("a.com") && !one.matches("x.y.a.com"));
        assert!(any.matches("x.a.com") && any.matches("x.y.a.com"));
        assert!(!any.matches("a.com") && !any.matches("evila.com"));
        assert!(!any.matches("a.com.evil.net"));
        for bad in ["a*.com", "*a.com", "x.*.com", "*.1.2.3.4", "**.", "*."] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let z = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(z.contains("1.2.3.4".parse().unwrap()));
        assert!(!z.contains("::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8")
            .unwrap_err()
            .why
            .contains("10.0.0.0/8"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.0/104").unwrap(),
            Cidr::parse("10.0.0.0/8").unwrap()
        );
    }
}
