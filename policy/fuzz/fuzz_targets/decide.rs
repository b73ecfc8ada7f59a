//! Hostile requests against a fixed policy: host normalisation, patterns,
//! networks, paths and MCP arguments never panic, and the matcher agrees
//! with a plain reading of the wildcard rules.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sbx_policy::{Access, Cidr, HostPattern, NetHost, Policy, PolicyBuilder};

const POLICY: &str = r#"
[[mount]]
host = "/src"
guest = "/workspace"
mode = "rw"

[[fs]]
action = "deny"
paths = ["**/.env", "/workspace/secret/**"]

[[network]]
id = "one"
action = "allow"
to = ["*.a.com", "b.com:443", "10.0.0.0/8", "[2001:db8::1]:443"]

[[network]]
id = "deep"
action = "allow"
to = ["**.c.com"]
ports = ["1-1024"]

[[network]]
action = "deny"
to = ["x.c.com", "fc00::/7"]

[[mcp]]
action = "allow"
server = "gh"
tools = ["get_*"]
args.repo = { glob = "acme/*" }
args.q = { regex = "[a-z]+" }
"#;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let mut b = PolicyBuilder::new();
        b.add_text("fixed.toml", POLICY).unwrap();
        b.build().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let p = policy();
    let mut parts = s.splitn(3, '\n');
    let (a, b, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));

    if let Ok((host, port)) = sbx_policy::parse_host_port(a) {
        let d = p.decide_net(&host, None, port);
        let e = p.explain_net(&host, None, port);
        assert_eq!(d.allowed(), e.allowed());
        if let NetHost::Name(name) = &host {
            // Normalisation is idempotent.
            assert_eq!(sbx_policy::normalize_host(name).ok(), Some(host.clone()));
            // The wildcard rules, read plainly.
            let one = name.strip_suffix(".a.com").is_some_and(|l| !l.is_empty() && !l.contains('.'));
            assert_eq!(HostPattern::parse("*.a.com").unwrap().matches(name), one, "{name}");
            let deep = name.strip_suffix(".c.com").is_some_and(|l| !l.is_empty());
            assert_eq!(HostPattern::parse("**.c.com").unwrap().matches(name), deep, "{name}");
        }
    }
    let _ = HostPattern::parse(b);
    if let Ok(c) = Cidr::parse(b) {
        assert!(c.contains(c.network()));
    }
    let _ = p.decide_fs(b, Access::Read);
    let _ = p.decide_fs(b, Access::Write);
    if let Ok(serde_json::Value::Object(args)) = serde_json::from_str(c) {
        let (server, tool) = a.split_once('.').unwrap_or((a, b));
        let _ = p.decide_mcp(server, tool, &args);
    }
    let _ = p.decide_exec(c);
    let _ = sbx_policy::decode_public_key(c);
});
