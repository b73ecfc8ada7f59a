//! Table-driven decisions across every surface, against a merged policy of
//! org, team and project layers (plus an audit-mode rollout file and the
//! locked-down preset), and against the presets alone.
//!
//! Each row: surface | request | outcome | deciding rule | its layer.

use std::path::Path;

use sbx_policy::{parse_host_port, Access, Decision, Layer, NetHost, Policy, PolicyBuilder};

const FIXTURES: [&str; 4] = ["org.toml", "team.toml", "project.toml", "rollout.toml"];

fn fixture_policy() -> Policy {
    let mut b = PolicyBuilder::new();
    // Given out of layer order on purpose: layers come from the files.
    for f in FIXTURES.iter().rev() {
        let path = format!("{}/tests/fixtures/{f}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        b.add_text(f, &text).unwrap();
    }
    b.build().unwrap()
}

fn preset_policy(name: &str) -> Policy {
    let mut b = PolicyBuilder::new();
    b.preset(name).unwrap();
    b.build().unwrap()
}

fn decide<'p>(p: &'p Policy, surface: &str, q: &str) -> Decision<'p> {
    match surface {
        "net" => {
            let (target, resolved) = match q.split_once('@') {
                Some((t, ip)) => (t, Some(ip.parse().unwrap())),
                None => (q, None),
            };
            let (host, port) = parse_host_port(target).unwrap();
            p.explain_net(&host, resolved, port)
        }
        "fs" => {
            let (path, access) = q.rsplit_once(' ').unwrap();
            p.explain_fs(path, Access::parse(access).unwrap())
        }
        "credential" => {
            let (secret, host) = q.split_once('@').unwrap();
            let host = sbx_policy::normalize_host(host).unwrap();
            let (d, grant) = p.explain_credential(secret, &host);
            assert_eq!(
                d.allowed(),
                grant.is_some(),
                "{q}: a grant comes with every allow"
            );
            d
        }
        "mcp" => {
            let (call, args) = q.split_once(' ').unwrap();
            let (server, tool) = call.split_once('.').unwrap();
            let args: serde_json::Value = serde_json::from_str(args).unwrap();
            p.explain_mcp(server, tool, args.as_object().unwrap()).0
        }
        "exec" => p.explain_exec(q),
        "limits" => {
            let (v, m) = q.split_once(' ').unwrap();
            p.decide_limits(v.parse().unwrap(), m.parse().unwrap())
        }
        "disk" => p.decide_disk(q.parse().unwrap()),
        other => panic!("unknown surface {other}"),
    }
}

fn run_table(p: &Policy, table: &str) -> usize {
    let mut failures = Vec::new();
    let mut rows = 0;
    for line in table
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let [surface, q, outcome, rule, layer] = cols[..] else {
            panic!("bad row: {line}");
        };
        rows += 1;
        let d = decide(p, surface, q);
        let got = (d.outcome(), d.rule.id.as_str(), d.rule.layer.as_str());
        if got != (outcome, rule, layer) {
            failures.push(format!(
                "{surface} {q}: expected {outcome} by {rule} ({layer}), got {} by {} ({}): {}",
                got.0, got.1, got.2, d.reason
            ));
        }
        // Whatever decided is among the rules that matched, unless it is a
        // built-in or the read-only property of a mount.
        if d.rule.layer != sbx_policy::Layer::Builtin && !d.matched.is_empty() {
            assert!(
                d.matched.iter().any(|m| std::ptr::eq(*m, d.rule)),
                "{line}: deciding rule not listed"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {rows} rows wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    rows
}

const LAYERED: &str = r#"
# Network: host names, wildcards and normalisation.
net | registry.npmjs.org:443 | audit-deny | audit-no-npm | project
net | REGISTRY.NPMJS.ORG.:443 | audit-deny | audit-no-npm | project
net | registry.npmjs.org:80 | deny | default-deny | builtin
net | files.pythonhosted.org:443 | allow | team-registries | team
net | pythonhosted.org:443 | deny | default-deny | builtin
net | a.b.pythonhosted.org:443 | deny | default-deny | builtin
net | github.com:443 | allow | team-registries | team
net | api.github.com:443 | allow | team-registries | team
net | x.y.github.com:443 | allow | team-registries | team
net | evilgithub.com:443 | deny | default-deny | builtin
net | github.com.evil.net:443 | deny | default-deny | builtin
net | github.com:22 | deny | default-deny | builtin
net | api.example.com:443 | allow | proj-api | project
net | API.Example.COM:443 | allow | proj-api | project
net | api.example.com.:443 | allow | proj-api | project
net | api.example.com:80 | deny | default-deny | builtin
net | img.cdn.example.com:8443 | allow | proj-api | project
net | cdn.example.com:443 | deny | default-deny | builtin
net | a.img.cdn.example.com:443 | deny | default-deny | builtin
net | bücher.example:443 | allow | proj-api | project
net | BÜCHER.example:443 | allow | proj-api | project
net | xn--bcher-kva.example:443 | allow | proj-api | project
net | tracker.example.com:443 | deny | proj-deny-tracker | project
net | 8.8.8.8:53 | deny | default-deny | builtin
# Layer conflicts: no lower layer loosens a higher layer's deny.
net | 10.1.2.3:443 | deny | org-no-private | org
net | 10.1.3.3:443 | deny | org-no-private | org
net | 192.168.1.1:80 | deny | org-no-private | org
net | 169.254.169.254:80 | deny | org-no-metadata | org
net | [fd00:ec2::254]:80 | deny | org-no-metadata | org
net | metadata.google.internal:80 | deny | org-no-metadata | org
net | pastebin.com:443 | deny | org-no-pastebin | org
net | www.pastebin.com:443 | deny | org-no-pastebin | org
net | mail.example.com:25 | deny | org-no-smtp | org
net | api.example.com:587 | deny | org-no-smtp | org
net | img.cdn.example.com:465 | deny | org-no-smtp | org
# Addresses: literals, odd IPv4 spellings, IPv6, mapped addresses, CIDR edges.
net | 127.0.0.1:8080 | allow | proj-localhost | project
net | 127.1:8080 | allow | proj-localhost | project
net | 0x7f.0.0.1:8080 | allow | proj-localhost | project
net | 2130706433:8080 | allow | proj-localhost | project
net | 127.0.0.1:8081 | deny | default-deny | builtin
net | 127.0.0.2:8080 | deny | default-deny | builtin
net | [::1]:8080 | allow | proj-localhost | project
net | [0:0:0:0:0:0:0:1]:8080 | allow | proj-localhost | project
net | [::ffff:127.0.0.1]:8080 | allow | proj-localhost | project
net | [::ffff:10.1.2.3]:443 | deny | org-no-private | org
net | [::ffff:a01:203]:443 | deny | org-no-private | org
net | [2001:db8:1::5]:8080 | allow | team-ipv6-svc | team
net | [2001:db8:1:ffff:ffff:ffff:ffff:ffff]:8999 | allow | team-ipv6-svc | team
net | [2001:db8:1::5]:8000 | allow | team-ipv6-svc | team
net | [2001:db8:1::5]:7999 | deny | default-deny | builtin
net | [2001:db8:1::5]:9000 | deny | default-deny | builtin
net | [2001:db8:2::5]:8080 | deny | default-deny | builtin
net | [fd12::1]:8080 | deny | org-no-private | org
net | [fe80::1]:8080 | deny | default-deny | builtin
net | 11.0.0.1:443 | deny | default-deny | builtin
net | 9.255.255.255:443 | deny | default-deny | builtin
net | 10.255.255.255:443 | deny | org-no-private | org
# A name is also checked against the address it resolved to.
net | api.example.com:443@10.0.0.5 | deny | org-no-private | org
net | api.example.com:443@::ffff:192.168.0.1 | deny | org-no-private | org
net | api.example.com:443@93.184.216.34 | allow | proj-api | project
# Files: mounts, deny globs from every layer, read-only, path tricks.
fs | /workspace/src/main.rs read | allow | workspace | project
fs | /workspace/src/main.rs write | allow | workspace | project
fs | /workspace read | allow | workspace | project
fs | /workspace/.env read | deny | proj-env | project
fs | /workspace/sub/dir/.env write | deny | proj-env | project
fs | /workspace/.env.local read | deny | secret-files | preset
fs | /workspace/.ssh/id_rsa read | deny | org-secrets | org
fs | /workspace/a/.ssh read | deny | org-secrets | org
fs | /workspace/certs/server.pem read | deny | org-secrets | org
fs | /workspace/x.pem.txt read | allow | workspace | project
fs | /workspace/vendor/lib.rs read | allow | workspace | project
fs | /workspace/vendor/lib.rs write | deny | proj-vendor-ro | project
fs | /workspace/vendorx/lib.rs write | allow | workspace | project
fs | /docs/readme.md read | allow | docs | project
fs | /docs/readme.md write | deny | docs | project
fs | /docs/../workspace/a.txt write | allow | workspace | project
fs | /etc/passwd read | deny | default-deny | builtin
fs | /workspace/../etc/shadow read | deny | default-deny | builtin
fs | /workspacex/a read | deny | default-deny | builtin
fs | /workspace/build.log read | audit-deny | audit-no-logs | project
fs | /docs/app.log write | deny | docs | project
fs | /docs/.ssh/config write | deny | org-secrets | org
# Credentials: which secret may go where.
credential | GITHUB_TOKEN@api.github.com | allow | team-gh | team
credential | GITHUB_TOKEN@API.GITHUB.COM. | allow | team-gh | team
credential | GITHUB_TOKEN@github.com | deny | default-deny | builtin
credential | GITHUB_TOKEN@uploads.github.com | deny | default-deny | builtin
credential | GITHUB_TOKEN@pastebin.com | deny | org-never-pastebin | org
credential | NPM_TOKEN@registry.npmjs.org | allow | proj-npm | project
credential | NPM_TOKEN@api.github.com | deny | default-deny | builtin
credential | NPM_TOKEN@x.pastebin.com | deny | org-never-pastebin | org
credential | OTHER@api.github.com | deny | default-deny | builtin
credential | GITHUB_TOKEN@10.0.0.1 | deny | default-deny | builtin
# MCP tools: servers, tool globs, argument constraints, org denies.
mcp | github.get_issue {"repo":"acme/web"} | allow | team-gh-read | team
mcp | github.list_prs {"repo":"acme/api","state":"open"} | allow | team-gh-read | team
mcp | github.get_issue {"repo":"evil/web"} | deny | default-deny | builtin
mcp | github.get_issue {"repo":"acme/web/x"} | deny | default-deny | builtin
mcp | github.get_issue {} | deny | default-deny | builtin
mcp | github.get_issue {"repo":5} | deny | default-deny | builtin
mcp | github.create_issue {"repo":"acme/web"} | deny | default-deny | builtin
mcp | github.delete_branch {"repo":"acme/web"} | deny | org-no-delete | org
mcp | files.read_file {"path":"/workspace/src/a.rs"} | allow | proj-fs | project
mcp | files.read_file {"path":"/etc/passwd"} | deny | default-deny | builtin
mcp | files.read_file {"path":"x/workspace/a"} | deny | default-deny | builtin
mcp | files.delete_file {"path":"/workspace/a"} | deny | org-no-delete | org
mcp | other.get_thing {} | deny | default-deny | builtin
# Exec: argv[0] by file name, or by full path when the glob has a slash.
exec | ls | allow | any-command | preset
exec | /bin/ls | allow | any-command | preset
exec | cargo | allow | any-command | preset
exec | nc | deny | org-no-nc | org
exec | /usr/bin/nc | deny | org-no-nc | org
exec | /usr/bin/socat | deny | org-no-nc | org
exec | /usr/local/bin/socat | allow | any-command | preset
exec | curl | deny | proj-no-curl | project
exec | /usr/local/bin/wget | deny | proj-no-curl | project
exec | python3 | audit-deny | audit-no-python | project
# Limits: the lowest value any layer sets.
limits | 2 1024 | allow | within-limits | builtin
limits | 4 4096 | allow | within-limits | builtin
limits | 5 1024 | deny | limits.vcpus | team
limits | 9 1024 | deny | limits.vcpus | team
limits | 2 4097 | deny | limits.memory_mib | project
disk | 8192 | allow | within-limits | builtin
disk | 20480 | allow | within-limits | builtin
disk | 20481 | deny | limits.disk_mib | org
"#;

const PRESETS: &[(&str, &str)] = &[
    (
        "locked-down",
        r#"
net | registry.npmjs.org:443 | deny | default-deny | builtin
net | 1.1.1.1:443 | deny | default-deny | builtin
mcp | github.get_issue {} | deny | default-deny | builtin
exec | bash | allow | any-command | preset
fs | /workspace/a read | deny | default-deny | builtin
"#,
    ),
    (
        "balanced",
        r#"
net | registry.npmjs.org:443 | allow | package-registries | preset
net | pypi.org:80 | allow | package-registries | preset
net | raw.githubusercontent.com:443 | allow | git-hosts | preset
net | github.com:22 | allow | git-hosts | preset
net | github.com:8080 | deny | default-deny | builtin
net | evil.com:443 | deny | default-deny | builtin
net | 140.82.112.3:443 | deny | default-deny | builtin
"#,
    ),
    (
        "open",
        r#"
net | example.org:1234 | allow | anywhere | preset
net | [2001:db8::1]:443 | allow | anywhere | preset
net | 169.254.169.254:80 | deny | cloud-metadata | preset
net | [::ffff:169.254.169.254]:80 | deny | cloud-metadata | preset
net | [fd00:ec2::254]:80 | deny | cloud-metadata | preset
net | metadata.google.internal.:80 | deny | cloud-metadata | preset
mcp | anything.at_all {"x":1} | allow | any-tool | preset
"#,
    ),
];

#[test]
fn layered_decisions() {
    let p = fixture_policy();
    let mut rows = run_table(&p, LAYERED);
    for (preset, table) in PRESETS {
        rows += run_table(&preset_policy(preset), table);
    }
    assert!(rows >= 100, "only {rows} decisions");
}

#[test]
fn decisions_name_their_source() {
    let p = fixture_policy();
    let (h, port) = parse_host_port("10.1.2.3:443").unwrap();
    let d = p.explain_net(&h, None, port);
    assert_eq!(d.rule.location.to_string(), "org.toml:10");
    // Both the org deny and the team allow matched; the deny won.
    let ids: Vec<&str> = d.matched.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["org-no-private", "team-internal"]);
    assert!(!d.allowed());
}

#[test]
fn mcp_argument_denial_says_which_argument() {
    let p = fixture_policy();
    let args = serde_json::json!({"repo": "evil/web"});
    let (d, _) = p.decide_mcp("github", "get_issue", args.as_object().unwrap());
    assert!(
        d.reason.contains("team-gh-read") && d.reason.contains("`repo`"),
        "{}",
        d.reason
    );
    let ok = serde_json::json!({"repo": "acme/web"});
    let (d, rate) = p.decide_mcp("github", "get_issue", ok.as_object().unwrap());
    assert!(d.allowed());
    assert_eq!(rate, Some(30));
}

#[test]
fn credentials_carry_their_injection() {
    let p = fixture_policy();
    let (d, grant) = p.decide_credential("GITHUB_TOKEN", &NetHost::Name("api.github.com".into()));
    assert!(d.allowed());
    let g = grant.unwrap();
    assert_eq!(g.env, "GITHUB_TOKEN");
    assert_eq!(
        g.injection,
        sbx_policy::Injection::Header {
            name: "Authorization".into(),
            format: "Bearer {secret}".into()
        }
    );
    let grants: Vec<&str> = p
        .credential_grants()
        .map(|(g, _)| g.secret.as_str())
        .collect();
    assert_eq!(grants, ["GITHUB_TOKEN", "NPM_TOKEN"]);
}

#[test]
fn limits_and_mounts_show_where_they_come_from() {
    let p = fixture_policy();
    let l = p.limits();
    assert_eq!(
        l.vcpus.as_ref().map(|v| (v.value, v.rule.layer.as_str())),
        Some((4, "team"))
    );
    assert_eq!(l.memory_mib.as_ref().map(|v| v.value), Some(4096));
    assert_eq!(l.lifetime_secs.as_ref().map(|v| v.value), Some(8 * 3600));
    let mounts: Vec<(&str, bool)> = p.mounts().iter().map(|m| (m.guest, m.read_only)).collect();
    assert_eq!(mounts, [("/workspace", false), ("/docs", true)]);
}

#[test]
fn audit_mode_never_opens_what_nothing_allowed() {
    let mut b = PolicyBuilder::new();
    b.add_text(
        "a.toml",
        "mode = \"audit\"\n[[network]]\naction = \"deny\"\nto = [\"x.com\"]\n",
    )
    .unwrap();
    let p = b.build().unwrap();
    let (h, port) = parse_host_port("x.com:443").unwrap();
    let d = p.decide_net(&h, None, port);
    assert_eq!((d.outcome(), d.rule.id.as_str()), ("deny", "default-deny"));
}

#[test]
fn deny_all_denies() {
    let p = Policy::deny_all();
    let (h, port) = parse_host_port("example.com:443").unwrap();
    assert!(!p.decide_net(&h, None, port).allowed());
    assert!(!p.decide_exec("ls").allowed());
    assert!(!p.decide_fs("/workspace/a", Access::Read).allowed());
}

#[test]
fn audit_mode_denials_keep_the_allowing_rules_terms() {
    let mut b = PolicyBuilder::new();
    b.add_text(
        "p.toml",
        "[[credential]]\naction = \"allow\"\nsecret = \"T\"\nhosts = [\"a.com\"]\n\
         [[mcp]]\naction = \"allow\"\nserver = \"s\"\ncalls_per_minute = 5\n",
    )
    .unwrap();
    b.add_text(
        "rollout.toml",
        "mode = \"audit\"\n[[credential]]\naction = \"deny\"\nsecret = \"*\"\nhosts = [\"*\"]\n\
         [[mcp]]\naction = \"deny\"\nserver = \"*\"\n",
    )
    .unwrap();
    let p = b.build().unwrap();
    let (d, grant) = p.decide_credential("T", &NetHost::Name("a.com".into()));
    assert_eq!(d.outcome(), "audit-deny");
    assert!(
        grant.is_some(),
        "allowed through audit mode, so the grant applies"
    );
    let (d, rate) = p.decide_mcp("s", "t", &serde_json::Map::new());
    assert_eq!((d.outcome(), rate), ("audit-deny", Some(5)));
}

#[test]
fn session_mounts_meet_the_deny_rules() {
    let mut p = preset_policy("locked-down");
    // The workspace: allowed, and its secret files are still denied inside.
    p.grant_mount(Path::new("/home/u/proj"), "/workspace", false)
        .expect("a plain project directory mounts");
    assert!(p
        .decide_fs("/workspace/src/main.rs", Access::Write)
        .allowed());
    let d = p.decide_fs("/workspace/.env", Access::Read);
    assert!(!d.allowed());
    assert_eq!(d.rule.id, "secret-files");
    assert_eq!(p.mounts()[0].rule.layer, Layer::Session);
    // A host directory the deny rules cover is refused before boot, named.
    let err = p
        .grant_mount(Path::new("/home/u/.ssh"), "/keys", true)
        .unwrap_err();
    assert_eq!(
        err.rule.as_ref().map(|r| r.id.as_str()),
        Some("secret-files")
    );
    assert!(err.reason.contains("/home/u/.ssh"), "{}", err.reason);
    assert!(p.decide_fs("/keys/id_rsa", Access::Read).rule.id != "session-mounts");
    // The guest's own directories and relative paths are not mount points.
    assert!(p
        .grant_mount(Path::new("/tmp/x"), "/proc/x", false)
        .is_err());
    assert!(p.grant_mount(Path::new("/tmp/x"), "rel", false).is_err());
    // One guest path, one host directory.
    let err = p
        .grant_mount(Path::new("/other"), "/workspace", false)
        .unwrap_err();
    assert!(err.reason.contains("already mounted"), "{}", err.reason);
}

fn text_policy(text: &str) -> Policy {
    let mut b = PolicyBuilder::new();
    b.add_text("egress.toml", text).unwrap();
    b.build().unwrap()
}

#[test]
fn resolved_non_public_addresses_need_an_address_rule() {
    let p = text_policy(
        r#"
version = 1
[[network]]
id = "web"
action = "allow"
to = ["allowed.test", "*"]
[[network]]
id = "lab"
action = "allow"
to = ["10.9.0.0/16"]
ports = [443]
"#,
    );
    let name = NetHost::Name("allowed.test".into());
    let ip = |s: &str| s.parse().unwrap();
    let d = p.decide_connect(&name, ip("93.184.216.34"), 443);
    assert!(d.allowed(), "{}", d.reason);
    for (addr, class) in [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:192.168.1.1", "private"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade"),
    ] {
        let d = p.decide_connect(&name, ip(addr), 443);
        assert!(!d.allowed(), "{addr} allowed");
        assert_eq!(d.rule.id, "non-public-address", "{addr}");
        assert!(d.reason.contains(class), "{addr}: {}", d.reason);
        assert!(d.reason.contains("resolves to"), "{}", d.reason);
    }
    // Named by an address rule, on its port only.
    assert!(p.decide_connect(&name, ip("10.9.3.4"), 443).allowed());
    assert!(!p.decide_connect(&name, ip("10.9.3.4"), 80).allowed());
    let lit = NetHost::Ip(ip("127.0.0.1"));
    let d = p.decide_connect(&lit, ip("127.0.0.1"), 80);
    assert!(
        d.reason.contains("127.0.0.1 is a loopback address"),
        "{}",
        d.reason
    );
}

#[test]
fn request_rules_and_interception_opt_out() {
    let p = text_policy(
        r#"
version = 1
[[network]]
action = "allow"
to = ["api.github.com", "pinned.example"]
[[network]]
id = "pinned"
action = "allow"
to = ["pinned.example"]
intercept = false
[[http]]
id = "gh-read"
action = "allow"
hosts = ["api.github.com"]
methods = ["get"]
paths = ["/repos/acme/**"]
[[http]]
id = "no-secrets-repo"
action = "deny"
hosts = ["api.github.com"]
paths = ["/repos/acme/secrets/**"]
"#,
    );
    let gh = NetHost::Name("api.github.com".into());
    assert!(p.restricts_http(&gh));
    let d = |m: &str, path: &str| p.decide_http(&gh, m, path).unwrap();
    assert!(d("GET", "/repos/acme/x/issues").allowed());
    assert_eq!(d("POST", "/repos/acme/x/issues").rule.id, "default-deny");
    assert_eq!(d("GET", "/repos/other/x").rule.id, "default-deny");
    assert_eq!(d("GET", "/repos/acme/secrets/a").rule.id, "no-secrets-repo");
    let other = NetHost::Name("pinned.example".into());
    assert!(p.decide_http(&other, "DELETE", "/").is_none());
    assert!(p.passthrough(&other));
    assert!(!p.passthrough(&gh));

    let mut b = PolicyBuilder::new();
    let err = b
        .add_text(
            "bad.toml",
            "version = 1\n[[network]]\naction = \"deny\"\nto = [\"a.com\"]\nintercept = false\n",
        )
        .and_then(|b| std::mem::take(b).build().map(|_| ()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("bad.toml:5"), "{err}");
}

/// `links = "leaving"` denies creating symlinks that point out of their
/// share, and nothing else; without such a rule there is no decision.
#[test]
fn leaving_links_are_denied_only_where_a_rule_says() {
    let text = r#"
[[fs]]
id = "no-leaving-links"
action = "deny"
paths = ["**"]
links = "leaving"
"#;
    let mut p = text_policy(text);
    p.grant_mount(Path::new("/home/u/proj"), "/workspace", false)
        .unwrap();
    let d = p
        .decide_leaving_link("/workspace/out", "/etc/passwd")
        .expect("the rule covers it");
    assert!(!d.allowed());
    assert_eq!(d.rule.id, "no-leaving-links");
    assert!(
        d.reason.contains("/workspace/out -> /etc/passwd"),
        "{}",
        d.reason
    );
    // Reading and writing are not what it denies.
    assert!(p.decide_fs("/workspace/out", Access::Write).allowed());
    // No rule, no decision: the link is made and recorded.
    let mut open = preset_policy("locked-down");
    open.grant_mount(Path::new("/home/u/proj"), "/workspace", false)
        .unwrap();
    assert!(open
        .decide_leaving_link("/workspace/out", "/etc/passwd")
        .is_none());
    // Mistakes are named.
    for (bad, words) in [
        ("links = \"outside\"", "is not \"leaving\""),
        ("links = \"leaving\"\naccess = \"read\"", "drop `access`"),
    ] {
        let text = format!("[[fs]]\nid = \"x\"\naction = \"deny\"\npaths = [\"**\"]\n{bad}\n");
        let mut b = PolicyBuilder::new();
        b.add_text("bad.toml", &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let Err(e) = b.build() else {
            panic!("{bad} was accepted")
        };
        assert!(e.to_string().contains(words), "{e}");
    }
    // In audit mode the refusal is recorded but the link is made.
    let mut audit = text_policy(&format!("mode = \"audit\"\n{text}"));
    audit
        .grant_mount(Path::new("/home/u/proj"), "/workspace", false)
        .unwrap();
    let d = audit.decide_leaving_link("/workspace/out", "/x").unwrap();
    assert!(d.allowed());
}
