//! The org's `[delegate]` table: which kinds of allow rules team and local
//! policy may add. Denies are always fine; an allow of a kind not delegated
//! fails the load, naming the rule and the org's line.

use sbx_policy::{parse_host_port, PolicyBuilder, PolicyError};

const ORG: &str = r#"layer = "org"

[delegate]
team = ["network", "mcp"]
local = ["network"]

[[network]]
id = "org-no-paste"
action = "deny"
to = ["paste.test"]
"#;

fn load(files: &[(&str, &str)]) -> Result<sbx_policy::Policy, PolicyError> {
    let mut b = PolicyBuilder::new();
    for (name, text) in files {
        b.add_text(name, text)?;
    }
    b.build()
}

/// The error's file, line and message.
fn refusal(files: &[(&str, &str)]) -> (String, usize, String) {
    match load(files) {
        Err(PolicyError::Invalid {
            file,
            line,
            message,
            ..
        }) => (file, line, message),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("loaded: {files:?}"),
    }
}

#[test]
fn delegated_kinds_load_and_decide_under_the_org() {
    let team = "layer = \"team\"\n[[network]]\naction = \"allow\"\nto = [\"api.web.test\", \"paste.test\"]\n\
                [[mcp]]\naction = \"allow\"\nserver = \"github\"\n";
    let project = "[[network]]\naction = \"allow\"\nto = [\"docs.test\"]\n\
                   [[exec]]\naction = \"deny\"\ncommands = [\"nc\"]\n\
                   [[mount]]\nhost = \"/tmp\"\nguest = \"/x\"\nmode = \"ro\"\n";
    // The mount is a grant: not delegated to local policy.
    let (file, line, msg) = refusal(&[("org.toml", ORG), ("team.toml", team), ("p.toml", project)]);
    assert_eq!((file.as_str(), line), ("p.toml", 7), "{msg}");
    assert!(msg.contains("local policy may not allow `mount`"), "{msg}");
    assert!(msg.contains("org.toml:5"), "names the org's line: {msg}");
    assert!(msg.contains("only network"), "{msg}");

    let project = "[[network]]\naction = \"allow\"\nto = [\"docs.test\"]\n\
                   [[exec]]\naction = \"deny\"\ncommands = [\"nc\"]\n";
    let p = load(&[("org.toml", ORG), ("team.toml", team), ("p.toml", project)]).unwrap();
    let (host, port) = parse_host_port("paste.test:443").unwrap();
    let d = p.decide_net(&host, None, port);
    assert_eq!((d.allowed(), d.rule.id.as_str()), (false, "org-no-paste"));
    let (host, port) = parse_host_port("docs.test:443").unwrap();
    assert!(p.decide_net(&host, None, port).allowed());
    let shown = p.delegation();
    assert_eq!(shown.team.as_ref().unwrap().kinds, ["network", "mcp"]);
    assert_eq!(
        shown.local.as_ref().unwrap().location.to_string(),
        "org.toml:5"
    );
}

#[test]
fn a_team_allow_of_a_kind_kept_by_the_org_is_refused_at_its_line() {
    let team = "layer = \"team\"\n\n[[exec]]\nid = \"team-curl\"\naction = \"allow\"\ncommands = [\"curl\"]\n";
    let (file, line, msg) = refusal(&[("org.toml", ORG), ("team.toml", team)]);
    assert_eq!((file.as_str(), line), ("team.toml", 3), "{msg}");
    assert!(msg.contains("team policy may not allow `exec`"), "{msg}");
    assert!(msg.contains("make this rule a deny"), "{msg}");
    // The same rule as a deny narrows, which is always the team's to do.
    let deny = team.replace("\"allow\"", "\"deny\"");
    load(&[("org.toml", ORG), ("team.toml", &deny)]).unwrap();
}

#[test]
fn only_the_org_delegates_and_only_kinds_of_rules() {
    let (file, line, msg) = refusal(&[(
        "p.toml",
        "[[network]]\naction = \"deny\"\nto = [\"x.test\"]\n\n[delegate]\nlocal = [\"mount\"]\n",
    )]);
    assert_eq!((file.as_str(), line), ("p.toml", 5), "{msg}");
    assert!(msg.contains("only the org policy delegates"), "{msg}");
    let (file, line, msg) = refusal(&[(
        "org.toml",
        "layer = \"org\"\n[delegate]\nteam = [\"network\", \"netwrok\"]\n",
    )]);
    assert_eq!((file.as_str(), line), ("org.toml", 3), "{msg}");
    assert!(msg.contains("`netwrok` is not a kind of rule"), "{msg}");
    let (_, line, msg) = refusal(&[("org.toml", "layer = \"org\"\n[delegate]\nteams = []\n")]);
    assert_eq!(line, 3, "a misspelt key is an error: {msg}");
}

#[test]
fn without_delegate_every_layer_may_allow_and_two_org_files_narrow() {
    let open = "layer = \"org\"\n";
    let project = "[[exec]]\naction = \"allow\"\ncommands = [\"curl\"]\n";
    load(&[("org.toml", open), ("p.toml", project)]).unwrap();
    // Only `team` given: local policy may still allow anything.
    let team_only = "layer = \"org\"\n[delegate]\nteam = []\n";
    load(&[("org.toml", team_only), ("p.toml", project)]).unwrap();
    let team = "layer = \"team\"\n[[network]]\naction = \"allow\"\nto = [\"a.test\"]\n";
    let (_, _, msg) = refusal(&[("org.toml", team_only), ("team.toml", team)]);
    assert!(msg.contains("delegates nothing"), "{msg}");
    // A second org file that delegates less wins for what both name.
    let narrower = "layer = \"org\"\n[delegate]\nteam = [\"mcp\"]\n";
    let (_, _, msg) = refusal(&[
        ("org.toml", ORG),
        ("org2.toml", narrower),
        ("team.toml", team),
    ]);
    assert!(msg.contains("team policy may not allow `network`"), "{msg}");
}

#[test]
fn with_keys_trusted_an_unsigned_team_file_counts_as_local() {
    let key = sbx_policy::generate_key().unwrap();
    let org = sbx_policy::sign(ORG, &key);
    let team = "layer = \"team\"\n[[mcp]]\naction = \"allow\"\nserver = \"github\"\n";
    let mut b = PolicyBuilder::new();
    b.trust(key.verifying_key());
    b.add_text("org.bundle", &org).unwrap();
    b.add_text("team.toml", team).unwrap();
    let Err(PolicyError::Invalid { message, .. }) = b.build() else {
        panic!("an unsigned file claimed the team's delegation")
    };
    assert!(
        message.contains("local policy may not allow `mcp`"),
        "{message}"
    );
    // Signed with the org's key, the same file is the team's.
    let mut b = PolicyBuilder::new();
    b.trust(key.verifying_key());
    b.add_text("org.bundle", &org).unwrap();
    b.add_text("team.bundle", &sbx_policy::sign(team, &key))
        .unwrap();
    b.build().unwrap();
}
