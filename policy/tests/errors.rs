//! Malformed policies fail with the file, line and column, and say what to
//! write instead; none panics.

use sbx_policy::{PolicyBuilder, PolicyError};

fn error(text: &str) -> String {
    let mut b = PolicyBuilder::new();
    match b.add_text("p.toml", text).map(|_| ()) {
        Err(e) => e.to_string(),
        Ok(()) => match b.build() {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted:\n{text}"),
        },
    }
}

#[test]
fn errors_point_at_the_problem() {
    let cases: &[(&str, &str)] = &[
        ("version = 2\n", "p.toml:1:11: this sbx reads policy version 1"),
        ("[[network]]\naction = \"allow\"\nto = [\"a.com\"]\nport = [1]\n", "p.toml:4:1: unknown field `port`"),
        ("[[network]]\naction = \"permit\"\nto = [\"a.com\"]\n", "p.toml:2:10: action `permit` is not"),
        ("[[network]]\naction = \"allow\"\nto = [\"a*.com\"]\n", "p.toml:3:7: `a*.com` is not a valid host: a wildcard must be a whole leading label"),
        ("[[network]]\naction = \"allow\"\nto = [\"10.0.0.1/8\"]\n", "did you mean 10.0.0.0/8?"),
        ("[[network]]\naction = \"allow\"\nto = [\"a.com\"]\nports = [70000]\n", "p.toml:4:10: a port is a number"),
        ("[[network]]\naction = \"allow\"\nto = [\"a.com:443\"]\nports = [80]\n", "give the port in one place"),
        ("[[network]]\naction = \"allow\"\nto = []\n", "p.toml:1:1: `to` is empty"),
        ("[[network]]\nid = \"x\"\naction = \"allow\"\nto = [\"a.com\"]\n[[network]]\nid = \"x\"\naction = \"deny\"\nto = [\"b.com\"]\n", "p.toml:6:6: id `x` is already used on line 1"),
        ("[[fs]]\naction = \"allow\"\npaths = [\"a\"]\n", "file rules only deny; grant access with a [[mount]]"),
        ("[[fs]]\naction = \"deny\"\npaths = [\"a[\"]\n", "p.toml:3:10: bad glob"),
        ("[[mount]]\nhost = \"/a\"\nguest = \"/\"\n", "cannot mount over `/`"),
        ("[[mount]]\nhost = \"/a\"\nguest = \"/proc/x\"\n", "cannot mount over `/proc/x`"),
        ("[[mount]]\nhost = \"/a\"\nguest = \"rel\"\n", "p.toml:3:9: the guest path must be absolute"),
        ("[[mount]]\nhost = \"/a\"\nguest = \"/w\"\nmode = \"rx\"\n", "mount mode `rx`"),
        ("[[mount]]\nhost = \"/a\"\nguest = \"/w\"\n[[mount]]\nhost = \"/b\"\nguest = \"/w\"\n", "/w is already mounted from /a by p.toml:1"),
        ("[[mcp]]\naction = \"allow\"\nserver = \"s\"\nargs.x = { glob = \"a\", regex = \"b\" }\n", "needs exactly one of `glob` or `regex`"),
        ("[[mcp]]\naction = \"allow\"\nserver = \"s\"\nargs.x = { regex = \"(\" }\n", "bad regex for argument `x`"),
        ("[[mcp]]\naction = \"deny\"\nserver = \"s\"\ncalls_per_minute = 3\n", "calls_per_minute belongs on allow rules"),
        ("[[mcp]]\naction = \"allow\"\nserver = \"s\"\ncalls_per_minute = 0\n", "calls_per_minute is a positive number"),
        ("[[credential]]\naction = \"allow\"\nsecret = \"1X\"\nhosts = [\"a.com\"]\n", "a secret name is letters"),
        ("[[credential]]\naction = \"allow\"\nsecret = \"X\"\nhosts = [\"a.com\"]\nheader = \"Auth\"\nformat = \"Bearer\"\n", "`format` must contain `{secret}` exactly once"),
        ("[[credential]]\naction = \"allow\"\nsecret = \"X\"\nhosts = [\"a.com\"]\nformat = \"B {secret}\"\n", "`format` needs `header`"),
        ("[[credential]]\naction = \"deny\"\nsecret = \"X\"\nhosts = [\"a.com\"]\nenv = \"X\"\n", "a deny rule sends nothing"),
        ("[limits]\nvcpus = 0\n", "p.toml:2:9: vcpus must be from 1 to 254"),
        ("[limits]\nlifetime = \"forever\"\n", "a lifetime is a number with s, m, h or d"),
        ("layer = \"company\"\n", "layer `company` is not"),
        ("mode = \"warn\"\n", "mode `warn` is not"),
        ("preset = \"loose\"\n", "unknown preset `loose`"),
        ("[[network]\n", "p.toml:1:"),
        ("x = \"\u{0}\"", "p.toml:1:"),
        ("[[exec]]\naction = \"deny\"\ncommands = \"nc\"\n", "p.toml:3:12: invalid type"),
    ];
    let mut wrong = Vec::new();
    for (text, want) in cases {
        let got = error(text);
        if !got.contains(want) {
            wrong.push(format!("{text:?}\n  want: {want}\n  got:  {got}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn unsigned_org_policy_refused_once_keys_are_trusted() {
    let key = sbx_policy::generate_key().unwrap();
    let org = "layer = \"org\"\n[[exec]]\naction = \"deny\"\ncommands = [\"nc\"]\n";
    let mut b = PolicyBuilder::new();
    b.trust(key.verifying_key());
    let e = b.add_text("org.toml", org).err().unwrap();
    assert!(matches!(e, PolicyError::Bundle { .. }), "{e}");
    let bundle = sbx_policy::sign(org, &key);
    b.add_text("org.bundle", &bundle).unwrap();
    let p = b.build().unwrap();
    assert_eq!(
        p.sources()[0].signed_by.as_deref(),
        Some(sbx_policy::key_id(&key.verifying_key()).as_str())
    );
    // Lines inside a bundle are reported as the file shows them.
    let bad = sbx_policy::sign("[[exec]]\naction = \"nope\"\ncommands = [\"nc\"]\n", &key);
    let mut b = PolicyBuilder::new();
    b.trust(key.verifying_key());
    b.add_text("bad.bundle", &bad).unwrap();
    let e = b.build().err().unwrap().to_string();
    assert!(e.starts_with("bad.bundle:6:10:"), "{e}");
}
