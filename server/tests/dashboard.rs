//! The dashboard in a real browser (headless Chromium; screenshots under
//! `target/tmp/dashboard/`), on records a signed-in machine shipped: sign
//! in, a session's timeline, a refusal followed to the rule that made it,
//! the policy editor's error at its line, a fixed version in the history
//! with its diff. Then the role and sign-in checks, request by request.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

#[macro_use]
mod common;

use common::browser::Browser;
use common::*;

/// Records of session `s-1` on `bob-laptop`, decided by the policy the
/// server served that machine, shipped as `sbx audit ship` would.
fn ship_a_session(api: &Api<'_>, machine: &str) {
    let served = ok(api.get("/api/v1/policy", Some(machine)));
    let dir = tempfile::tempdir().unwrap();
    let mut b = sbx_policy::PolicyBuilder::new();
    b.trust(sbx_policy::decode_public_key(served["key"].as_str().unwrap()).unwrap());
    for (file, which) in [("org-v1.bundle", "org"), ("team-web-v1.bundle", "team")] {
        let path = dir.path().join("managed").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, served[which]["bundle"].as_str().unwrap()).unwrap();
        b.add_file(&path).unwrap();
    }
    let policy = b.build().unwrap();
    let log_path = dir.path().join("s-1.log");
    let log = sbx_audit::AuditLog::open(
        &log_path,
        sbx_audit::Identity {
            session: "s-1".into(),
            user: "bob@acme.example".into(),
            host: "bob-laptop".into(),
        },
        Duration::from_millis(10),
    )
    .unwrap();
    log.record(sbx_audit::Entry::session_start(
        "s-1",
        2,
        1024,
        &["org-v1.bundle"],
    ))
    .unwrap();
    for target in ["api.web.example:443", "pastebin.com:443"] {
        let (host, port) = sbx_policy::parse_host_port(target).unwrap();
        let d = policy.decide_net(&host, None, port);
        log.decision(sbx_policy::Surface::Net, "connect", target, &d)
            .unwrap();
    }
    log.close().unwrap();
    let lines = std::fs::read_to_string(&log_path).unwrap();
    let r = api
        .req("POST", "/api/v1/audit", Some(machine))
        .body(lines)
        .send()
        .unwrap();
    assert_eq!(ok(r)["accepted"], 3);
}

struct Org {
    admin: String,
    machine: String,
    alice: String,
    audrey: String,
    carol: String,
}

fn org(api: &Api<'_>) -> Org {
    let admin = first_admin(api);
    for t in ["web", "data"] {
        ok(api.json(
            "POST",
            "/api/v1/teams",
            Some(&admin),
            serde_json::json!({"name": t}),
        ));
    }
    ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), ORG));
    ok(api.text("PUT", "/api/v1/policy/teams/web", Some(&admin), TEAM));
    let bob = add_person(api, &admin, "bob@acme.example", "member", Some("web"));
    let machine = sign_in_machine(api, &bob, "bob-laptop");
    ship_a_session(api, &machine);
    Org {
        machine,
        alice: add_person(api, &admin, "alice@acme.example", "team-admin", Some("web")),
        audrey: add_person(api, &admin, "audrey@acme.example", "auditor", None),
        carol: add_person(
            api,
            &admin,
            "carol@acme.example",
            "team-admin",
            Some("data"),
        ),
        admin,
    }
}

#[test]
fn a_person_follows_a_refusal_to_its_rule_and_fixes_a_policy_in_the_browser() {
    let s = start(Store::Sqlite, "dashboard_browser");
    let api = Api::new(&s);
    let Org { alice, .. } = org(&api);
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let mut b = Browser::start(&shots);

    // Every page is behind sign-in.
    b.open(&format!("{}/ui/sessions", s.url));
    assert!(b.url().ends_with("/ui/signin"), "{}", b.url());
    b.type_into("#token", &alice);
    b.click("#signin");
    b.settle();

    // First the overview: the session, its decisions by surface, what was
    // refused.
    b.wait_for("document.querySelector('#chart rect')");
    b.shot("1-overview");
    assert!(
        b.text("#refused").contains("pastebin.com:443"),
        "{}",
        b.text("#refused")
    );
    assert!(b.text("#totals").contains("1"), "{}", b.text("#totals"));
    b.click("header a[href='/ui/sessions']");
    b.settle();
    b.wait_for("document.querySelector('#sessions')");
    b.shot("2-sessions");
    assert!(b.text("#sessions").contains("bob-laptop"));

    // The session's timeline; the refusal names its rule, with a link.
    b.click("#sessions a");
    b.settle();
    b.wait_for("document.querySelector('#timeline')");
    b.shot("3-timeline");
    let timeline = b.text("#timeline");
    assert!(timeline.contains("pastebin.com:443"), "{timeline}");
    assert!(b.text("#chain").contains("Chain intact: 3 records"));
    b.click("tr.deny a.rule");
    b.settle();
    b.wait_for("document.querySelector('#text')");
    b.shot("4-rule");
    let url = b.url();
    assert!(url.ends_with("/ui/policy/org?v=1#L3"), "{url}");
    assert!(b.text("#L3").contains("[[network]]"), "{}", b.text("#L3"));
    assert!(b.text("#L4").contains("no-pastebin"));

    // The team's policy, edited: a mistake shows at its line as it is
    // typed; fixed, it becomes version 2, with its diff.
    b.open(&format!("{}/ui/policy/teams/web/edit", s.url));
    let broken =
        "layer = \"team\"\n\n[[network]]\naction = \"perhaps\"\nto = [\"api.web.example\"]\n";
    b.type_into("#text", broken);
    b.wait_for("document.querySelector('#error').textContent.includes('line 4')");
    b.shot("5-error");
    assert!(b.text("#error").contains("perhaps"), "{}", b.text("#error"));
    let fixed = "layer = \"team\"\n\n[[network]]\nid = \"web-api\"\naction = \"allow\"\nto = [\"api.web.example\", \"cdn.web.example\"]\nports = [443]\n";
    b.type_into("#text", fixed);
    b.wait_for("document.querySelector('#error').textContent === 'No errors.'");
    b.click("#save");
    b.settle();
    b.wait_for("document.querySelector('#diff')");
    b.shot("6-history");
    assert!(
        b.url().contains("/ui/policy/teams/web?v=2&diff=1"),
        "{}",
        b.url()
    );
    let diff = b.text("#diff");
    assert!(
        diff.contains("+ to = [\"api.web.example\", \"cdn.web.example\"]")
            && diff.contains("- to = [\"api.web.example\"]"),
        "{diff}"
    );
    let history = b.text("#history");
    assert!(
        history.contains("v2") && history.contains("alice@acme.example"),
        "{history}"
    );

    // Explain: the team's request is allowed by the rule just pushed; the
    // org's refusal wins over anything a team says, shown with its line.
    b.click("header a[href='/ui/policy']");
    b.settle();
    b.click("#explain");
    b.settle();
    b.wait_for("document.querySelector('#ask')");
    b.eval("document.querySelector('#team').value = 'web'; document.querySelector('#kind').value = 'net';");
    // Asks for `request` and returns the outcome and the deciding rule.
    let ask = |b: &mut Browser, request: &str, shot: &str| {
        b.type_into("#q", request);
        b.click("#go");
        b.settle();
        b.wait_for("document.querySelector('#answer')");
        b.shot(shot);
        (b.text("#outcome"), b.text("#rule"), b.text("#matched"))
    };
    let (outcome, rule, matched) = ask(&mut b, "cdn.web.example:443", "7-explain-allow");
    assert_eq!((outcome.as_str(), rule.as_str()), ("allow", "web-api"));
    assert!(matched.contains("team-web-v2:3"), "{matched}");
    let (outcome, rule, _) = ask(&mut b, "pastebin.com:443", "8-explain-deny");
    assert_eq!((outcome.as_str(), rule.as_str()), ("deny", "no-pastebin"));
    b.click("#matched a");
    b.settle();
    b.wait_for("document.querySelector('#text')");
    assert!(b.url().ends_with("/ui/policy/org?v=1#L3"), "{}", b.url());
}

fn save(url: &str, team: &str, cookie: &str, csrf: Option<&str>) -> StatusCode {
    let mut form = vec![("text", TEAM.replace("api.web.example", "api2.web.example"))];
    if let Some(c) = csrf {
        form.push(("csrf", c.to_string()));
    }
    bare()
        .post(format!("{url}/ui/policy/teams/{team}/edit"))
        .header("cookie", cookie)
        .form(&form)
        .send()
        .unwrap()
        .status()
}

on_both!(the_dashboard_checks_who_signs_in_and_what_each_role_may_do);
fn the_dashboard_checks_who_signs_in_and_what_each_role_may_do(store: Store) {
    let s = start(store, "dashboard_roles");
    let api = Api::new(&s);
    let org = org(&api);
    let url = &s.url;

    // Without a cookie, or with one the server did not make: sign in.
    for cookie in ["", "sbx_ui=sbxw_forged"] {
        for path in [
            "/ui/sessions",
            "/ui/sessions/bob-laptop/s-1",
            "/ui/policy/org",
            "/ui/policy/teams/web/edit",
            "/ui/policy/explain?kind=net&q=pastebin.com:443",
        ] {
            let r = bare()
                .get(format!("{url}{path}"))
                .header("cookie", cookie)
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path} with {cookie:?}");
            assert_eq!(r.headers()["location"], "/ui/signin");
        }
    }
    // A machine's token or a wrong one signs no one in.
    for (token, code) in [
        (org.machine.as_str(), StatusCode::FORBIDDEN),
        ("sbxu_wrong", StatusCode::UNAUTHORIZED),
    ] {
        let r = bare()
            .post(format!("{url}/ui/signin"))
            .form(&[("token", token)])
            .send()
            .unwrap();
        assert_eq!(r.status(), code);
        assert!(r.headers().get("set-cookie").is_none());
    }

    // An auditor sees everything and changes nothing.
    let (cookie, csrf) = sign_in(url, &org.audrey);
    let (c, page) = get_page(url, "/ui/overview?days=30", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(
        page.contains("pastebin.com:443") && page.contains("<svg id=\"chart\""),
        "{page}"
    );
    let (c, page) = get_page(url, "/ui/sessions/bob-laptop/s-1", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(page.contains("pastebin.com:443"));
    let (c, page) = get_page(url, "/ui/policy/teams/web", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(!page.contains("id=\"edit\""), "no edit link for an auditor");
    assert_eq!(
        get_page(url, "/ui/policy/teams/web/edit", &cookie).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        save(url, "web", &cookie, Some(&csrf)),
        StatusCode::FORBIDDEN
    );

    // An auditor may explain for any team.
    let (c, page) = get_page(
        url,
        "/ui/policy/explain?team=web&kind=net&q=pastebin.com%3A443",
        &cookie,
    );
    assert_eq!(c, StatusCode::OK);
    assert!(page.contains("no-pastebin"), "{page}");

    // A team admin sees their team only.
    let (cookie, csrf) = sign_in(url, &org.carol);
    assert_eq!(
        get_page(
            url,
            "/ui/policy/explain?team=web&kind=net&q=pastebin.com%3A443",
            &cookie
        )
        .0,
        StatusCode::FORBIDDEN
    );
    let (c, page) = get_page(url, "/ui/policy/explain", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(
        page.contains("team data") && !page.contains("team web"),
        "{page}"
    );
    let (c, page) = get_page(url, "/ui/overview", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(
        !page.contains("pastebin.com"),
        "another team's refusals in the overview"
    );
    let (c, page) = get_page(url, "/ui/sessions", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(
        !page.contains("bob-laptop"),
        "another team's session is listed"
    );
    assert_eq!(
        get_page(url, "/ui/sessions/bob-laptop/s-1", &cookie).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get_page(url, "/ui/policy/teams/web", &cookie).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        save(url, "web", &cookie, Some(&csrf)),
        StatusCode::FORBIDDEN
    );

    // CSRF: a form without the session's token, or with another's, does
    // nothing; with it, the push is made.
    let (cookie, csrf) = sign_in(url, &org.alice);
    assert_eq!(
        save(url, "web", &cookie, None),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        save(url, "web", &cookie, Some("forged")),
        StatusCode::FORBIDDEN
    );
    let (_, carols) = sign_in(url, &org.carol);
    assert_eq!(
        save(url, "web", &cookie, Some(&carols)),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        save(url, "web", &cookie, Some(&csrf)),
        StatusCode::SEE_OTHER
    );
    let log = api
        .get("/api/v1/admin-log", Some(&org.admin))
        .text()
        .unwrap();
    let pushes: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["action"] == "push_policy")
        .collect();
    assert_eq!(pushes.len(), 3, "org, web v1, and alice's v2 only: {log}");
    assert_eq!(pushes[2]["user"], "alice@acme.example");
    assert!(log.contains("person_signed_in"));

    // Signed out, the cookie no longer works.
    let r = bare()
        .post(format!("{url}/ui/signout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        get_page(url, "/ui/sessions", &cookie).0,
        StatusCode::SEE_OTHER
    );

    // Revoking the token alice signed in with ends her dashboard session.
    let (other_cookie, _) = sign_in(url, &org.alice);
    let id = token_id(&api, &org.alice);
    assert_eq!(
        get_page(url, "/ui/sessions", &other_cookie).0,
        StatusCode::OK
    );
    ok(api
        .req("DELETE", &format!("/api/v1/tokens/{id}"), Some(&org.admin))
        .send()
        .unwrap());
    assert_eq!(
        get_page(url, "/ui/sessions", &other_cookie).0,
        StatusCode::SEE_OTHER
    );
}
