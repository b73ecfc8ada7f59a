//! Any text as a policy file: an error or a policy, never a panic; and a
//! policy that loads answers questions without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbx_policy::{Access, NetHost, PolicyBuilder};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut b = PolicyBuilder::new();
    if b.add_text("fuzz.toml", text).is_err() {
        return;
    }
    let Ok(p) = b.build() else {
        return;
    };
    for host in ["a.com", "x.y.a.com", "xn--bcher-kva.example"] {
        let h = NetHost::Name(host.into());
        let _ = p.decide_net(&h, Some("10.0.0.1".parse().unwrap()), 443);
        let _ = p.decide_credential("TOKEN", &h);
    }
    let _ = p.decide_net(&NetHost::Ip("::1".parse().unwrap()), None, 80);
    let _ = p.decide_fs("/workspace/.env", Access::Read);
    let _ = p.decide_fs("/workspace/a/b", Access::Write);
    let args = serde_json::json!({"repo": "acme/x", "n": 1});
    let _ = p.decide_mcp("github", "get_issue", args.as_object().unwrap());
    let _ = p.decide_exec("/usr/bin/curl");
    let _ = p.decide_limits(4, 4096);
    let _ = p.mounts();
});
