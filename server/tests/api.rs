//! The control plane's API on the loopback, route by route: setup, teams,
//! people and roles, signing a machine in, pushing and fetching policy,
//! revocation, and the requests it must refuse.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

#[macro_use]
mod common;

use common::*;

on_both!(the_api_from_setup_to_a_signed_in_machine_fetching_policy);
fn the_api_from_setup_to_a_signed_in_machine_fetching_policy(store: Store) {
    let s = start(store, "api_flow");
    let api = Api::new(&s);

    // Setup: once, with the right token.
    let (code, _) = status(api.json(
        "POST",
        "/api/v1/setup",
        None,
        json!({"setup_token": "sbxs_wrong", "email": "root@acme.example"}),
    ));
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let admin = ok(api.json(
        "POST",
        "/api/v1/setup",
        None,
        json!({"setup_token": s.setup, "email": "root@acme.example"}),
    ));
    let admin = admin["token"].as_str().unwrap().to_string();
    let (code, _) = status(api.json(
        "POST",
        "/api/v1/setup",
        None,
        json!({"setup_token": s.setup, "email": "x@acme.example"}),
    ));
    assert_eq!(code, StatusCode::FORBIDDEN, "setup is once");

    // Teams and people.
    for t in ["web", "data"] {
        ok(api.json("POST", "/api/v1/teams", Some(&admin), json!({"name": t})));
    }
    let (code, _) = status(api.json(
        "POST",
        "/api/v1/teams",
        Some(&admin),
        json!({"name": "web"}),
    ));
    assert_eq!(code, StatusCode::CONFLICT);
    let mut tokens = std::collections::HashMap::new();
    for (email, role, team) in [
        ("alice@acme.example", "team-admin", Some("web")),
        ("bob@acme.example", "member", Some("web")),
        ("carol@acme.example", "member", Some("data")),
        ("audrey@acme.example", "auditor", None),
    ] {
        let u = ok(api.json(
            "POST",
            "/api/v1/users",
            Some(&admin),
            json!({"email": email, "role": role, "team": team}),
        ));
        tokens.insert(
            email.split('@').next().unwrap().to_string(),
            u["token"].as_str().unwrap().to_string(),
        );
    }
    let (alice, bob, audrey) = (&tokens["alice"], &tokens["bob"], &tokens["audrey"]);
    assert_eq!(ok(api.get("/api/v1/me", Some(bob)))["team"], "web");

    // Roles, route by route.
    let (code, body) = status(api.text("PUT", "/api/v1/policy/org", Some(bob), ORG));
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("member"), "{body}");
    assert_eq!(
        status(api.text("PUT", "/api/v1/policy/teams/web", Some(bob), TEAM)).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.json("POST", "/api/v1/teams", Some(bob), json!({"name": "x"}))).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.get("/api/v1/users", Some(bob))).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.text("PUT", "/api/v1/policy/teams/data", Some(alice), TEAM)).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.json(
            "POST",
            "/api/v1/users",
            Some(alice),
            json!({"email": "eve@acme.example", "role": "team-admin", "team": "web"})
        ))
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.json(
            "POST",
            "/api/v1/users",
            Some(alice),
            json!({"email": "eve@acme.example", "role": "member", "team": "data"})
        ))
        .0,
        StatusCode::FORBIDDEN
    );
    ok(api.json(
        "POST",
        "/api/v1/users",
        Some(alice),
        json!({"email": "dan@acme.example", "role": "member", "team": "web"}),
    ));
    assert_eq!(
        status(api.text("PUT", "/api/v1/policy/org", Some(audrey), ORG)).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        ok(api.get("/api/v1/users", Some(audrey)))
            .as_array()
            .unwrap()
            .len(),
        6
    );
    let web_only = ok(api.get("/api/v1/users", Some(alice)));
    assert!(
        web_only
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["team"] == "web"),
        "{web_only}"
    );

    // Policy: checked like `sbx policy check`, versioned.
    let (code, body) = status(api.text(
        "PUT",
        "/api/v1/policy/org",
        Some(&admin),
        "layer = \"org\"\n[[network]]\naction = \"maybe\"\nto = [\"x\"]\n",
    ));
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["line"], 3, "{body}");
    let (code, body) = status(api.text(
        "PUT",
        "/api/v1/policy/org",
        Some(&admin),
        "[[network]]\naction = \"deny\"\nto = [\"x\"]\n",
    ));
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("layer = \\\"org\\\"")
            || body["error"].as_str().unwrap().contains("layer = \"org\""),
        "{body}"
    );
    assert_eq!(
        status(api.text("PUT", "/api/v1/policy/org", Some(&admin), TEAM)).0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), ORG))["version"],
        1
    );
    assert_eq!(
        ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), ORG))["version"],
        2
    );
    assert_eq!(
        ok(api.text("PUT", "/api/v1/policy/teams/web", Some(alice), TEAM))["version"],
        1
    );
    assert_eq!(
        ok(api.get("/api/v1/policy/org", Some(audrey)))
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A machine signs in: a code, a person's approval, one token.
    let code = ok(api.json(
        "POST",
        "/api/v1/device/code",
        None,
        json!({"machine": "bob-laptop"}),
    ));
    let device = code["device_code"].as_str().unwrap();
    let user_code = code["user_code"].as_str().unwrap();
    assert!(code["verification_uri"]
        .as_str()
        .unwrap()
        .ends_with("/device"));
    let (c, body) = status(api.json(
        "POST",
        "/api/v1/device/token",
        None,
        json!({"device_code": device}),
    ));
    assert_eq!(
        (c, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("authorization_pending"))
    );
    ok(api.json(
        "POST",
        "/api/v1/device/approve",
        Some(bob),
        json!({"user_code": user_code.to_lowercase()}),
    ));
    let got = ok(api.json(
        "POST",
        "/api/v1/device/token",
        None,
        json!({"device_code": device}),
    ));
    let machine = got["token"].as_str().unwrap().to_string();
    assert_eq!(
        (got["email"].as_str(), got["team"].as_str()),
        (Some("bob@acme.example"), Some("web"))
    );
    let (c, _) = status(api.json(
        "POST",
        "/api/v1/device/token",
        None,
        json!({"device_code": device}),
    ));
    assert_eq!(c, StatusCode::UNAUTHORIZED, "a device code is used once");
    assert_eq!(
        status(api.json(
            "POST",
            "/api/v1/device/approve",
            Some(&machine),
            json!({"user_code": "BCDF-GHJK"})
        ))
        .0,
        StatusCode::FORBIDDEN,
        "a machine cannot approve machines"
    );
    assert_eq!(
        ok(api.get("/api/v1/me", Some(&machine)))["machine"],
        "bob-laptop"
    );

    // Its policy: signed by the org key it pinned, conditional.
    let r = api.get("/api/v1/policy", Some(&machine));
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let p = ok(r);
    assert_eq!(
        (p["org"]["version"].as_i64(), p["team"]["version"].as_i64()),
        (Some(2), Some(1))
    );
    let key = sbx_policy::decode_public_key(got["org_key"].as_str().unwrap()).unwrap();
    let mut b = sbx_policy::PolicyBuilder::new();
    b.trust(key);
    b.add_text("org.bundle", p["org"]["bundle"].as_str().unwrap())
        .unwrap();
    b.add_text("team.bundle", p["team"]["bundle"].as_str().unwrap())
        .unwrap();
    let policy = b.build().unwrap();
    let (host, port) = sbx_policy::parse_host_port("pastebin.com:443").unwrap();
    let d = policy.decide_net(&host, None, port);
    assert_eq!((d.allowed(), d.rule.id.as_str()), (false, "no-pastebin"));
    let r = api
        .req("GET", "/api/v1/policy", Some(&machine))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // carol's machine would get data's (empty) team policy, not web's.
    let carol = ok(api.get("/api/v1/policy", Some(&tokens["carol"])));
    assert!(carol["team"].is_null(), "{carol}");

    // Revocation takes effect at once; others' tokens are not bob's to revoke.
    let mine = ok(api.get("/api/v1/tokens", Some(bob)));
    let machine_id = mine
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "machine")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let admin_id = token_id(&api, &admin);
    assert_eq!(
        status(
            api.req("DELETE", &format!("/api/v1/tokens/{admin_id}"), Some(bob))
                .send()
                .unwrap()
        )
        .0,
        StatusCode::FORBIDDEN
    );
    ok(api
        .req("DELETE", &format!("/api/v1/tokens/{machine_id}"), Some(bob))
        .send()
        .unwrap());
    let (c, body) = status(api.get("/api/v1/policy", Some(&machine)));
    assert_eq!(c, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
}

on_both!(unauthenticated_malformed_and_oversized_requests_are_refused);
fn unauthenticated_malformed_and_oversized_requests_are_refused(store: Store) {
    let s = start(store, "api_refusals");
    let api = Api::new(&s);
    for (method, path) in [
        ("GET", "/api/v1/me"),
        ("GET", "/api/v1/teams"),
        ("POST", "/api/v1/teams"),
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("GET", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/1"),
        ("POST", "/api/v1/device/approve"),
        ("GET", "/api/v1/policy"),
        ("PUT", "/api/v1/policy/org"),
        ("GET", "/api/v1/policy/org"),
        ("PUT", "/api/v1/policy/teams/web"),
        ("POST", "/api/v1/audit"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/audit/heads"),
        ("GET", "/api/v1/audit/flags"),
        ("GET", "/api/v1/admin-log"),
        ("GET", "/api/v1/admin-log/verify"),
    ] {
        for token in [None, Some("sbxu_not-a-real-token")] {
            let r = api
                .req(method, path, token)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
        }
    }
    let admin = ok(api.json(
        "POST",
        "/api/v1/setup",
        None,
        json!({"setup_token": s.setup, "email": "root@acme.example"}),
    ));
    let admin = admin["token"].as_str().unwrap();
    let r = api
        .req("POST", "/api/v1/teams", Some(admin))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let (c, _) = status(api.json(
        "POST",
        "/api/v1/teams",
        Some(admin),
        json!({"name": "web", "extra": 1}),
    ));
    assert!(c.is_client_error(), "unknown fields are refused: {c}");
    let (c, body) = status(api.json(
        "POST",
        "/api/v1/teams",
        Some(admin),
        json!({"name": "Web Team"}),
    ));
    assert_eq!(c, StatusCode::BAD_REQUEST, "{body}");
    let big = "#".repeat(sbx_server::MAX_BODY + 10);
    let r = api.text("PUT", "/api/v1/policy/org", Some(admin), &big);
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Guessing device codes is slow: the anonymous routes are rate limited.
    let limited = (0..80)
        .map(|_| {
            api.json(
                "POST",
                "/api/v1/device/token",
                None,
                json!({"device_code": "sbxd_guess"}),
            )
            .status()
        })
        .filter(|s| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(limited > 0, "no rate limit on the device flow");
    let doc = ok(api.get("/api/v1/openapi.json", None));
    assert!(doc["paths"]["/api/v1/policy"].is_object());
}

on_both!(the_admin_log_is_a_chain_that_shows_an_edited_row);
fn the_admin_log_is_a_chain_that_shows_an_edited_row(store: Store) {
    let s = start(store, "admin_log");
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let audrey = add_person(&api, &admin, "audrey@acme.example", "auditor", None);
    ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), ORG));
    ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), ORG));

    // Who did what, in order, chained like a session's log.
    let text = api
        .get("/api/v1/admin-log", Some(&audrey))
        .error_for_status()
        .unwrap()
        .text()
        .unwrap();
    let v = sbx_audit::verify_lines(&text).expect("an intact chain");
    assert_eq!(v.records, 5, "{text}");
    let records: Vec<sbx_audit::Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.user.as_str(),
                r.event.action.as_str(),
                r.event.resource.as_str(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("root@acme.example", "setup", "root@acme.example"),
            ("root@acme.example", "create_team", "web"),
            ("root@acme.example", "create_user", "audrey@acme.example"),
            ("root@acme.example", "push_policy", "org"),
            ("root@acme.example", "push_policy", "org"),
        ]
    );
    assert!(records
        .iter()
        .all(|r| r.category == sbx_audit::Category::Admin));
    assert_eq!(
        ok(api.get("/api/v1/admin-log/verify", Some(&admin)))["intact"],
        true
    );
    let (c, _) = status(api.get(
        "/api/v1/admin-log",
        Some(&add_person(
            &api,
            &admin,
            "bob@acme.example",
            "member",
            Some("web"),
        )),
    ));
    assert_eq!(
        c,
        StatusCode::FORBIDDEN,
        "members do not read the admin log"
    );

    // Someone with the database in hand deletes a row: the server names
    // the record after the gap.
    s.db.run_now(|tx| {
        tx.execute(
            "DELETE FROM admin_log WHERE seq = 2",
            sbx_server::db::params![],
        )
    })
    .unwrap();
    let v = ok(api.get("/api/v1/admin-log/verify", Some(&audrey)));
    assert_eq!(
        (v["intact"].as_bool(), v["seq"].as_i64()),
        (Some(false), Some(3)),
        "{v}"
    );
    assert!(v["problem"].as_str().unwrap().contains("missing"), "{v}");
    // Or rewrites what a push said.
    s.db.run_now(|tx| {
        tx.execute(
            "UPDATE admin_log SET line = replace(line, '\"version\":2', '\"version\":1') WHERE seq = 5",
            sbx_server::db::params![],
        )
    })
    .unwrap();
    let v = ok(api.get("/api/v1/admin-log/verify", Some(&audrey)));
    assert_eq!(v["seq"], 5, "{v}");
    assert!(v["problem"].as_str().unwrap().contains("edited"), "{v}");
}

on_both!(a_token_past_its_rate_is_refused_until_the_minute_is_over);
fn a_token_past_its_rate_is_refused_until_the_minute_is_over(store: Store) {
    let s = start_with(database(store, "token_rate"), 20);
    let api = Api::new(&s);
    let admin = first_admin(&api);
    let audrey = add_person(&api, &admin, "audrey@acme.example", "auditor", None);
    let codes: Vec<StatusCode> = (0..25)
        .map(|_| api.get("/api/v1/me", Some(&admin)).status())
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == StatusCode::OK).count(),
        19,
        "one of 20 went on making audrey: {codes:?}"
    );
    let (c, body) = status(api.get("/api/v1/me", Some(&admin)));
    assert_eq!(c, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("too many"),
        "{body}"
    );
    // Another token is counted on its own.
    ok(api.get("/api/v1/me", Some(&audrey)));
}

/// What PostgreSQL is for: several instances behind a load balancer, one
/// database. What one instance writes, the other serves; pushes through
/// both at once get distinct versions; the admin chain stays one chain.
#[test]
fn two_instances_share_one_postgres_database() {
    let db = database(Store::Postgres, "two_instances");
    let a = start_with(db.clone(), 1200);
    let b = start_with(db, 1200);
    let api_a = Api::new(&a);
    let api_b = Api::new(&b);
    // Whichever instance printed the live setup token: the last to start.
    let admin = ok(api_b.json(
        "POST",
        "/api/v1/setup",
        None,
        json!({"setup_token": b.setup, "email": "root@acme.example"}),
    ))["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        ok(api_a.get("/api/v1/me", Some(&admin)))["role"],
        "org-admin"
    );
    let versions: Vec<i64> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let api = if i % 2 == 0 { &api_a } else { &api_b };
                let admin = &admin;
                sc.spawn(move || {
                    (0..3)
                        .map(|_| {
                            ok(api.text("PUT", "/api/v1/policy/org", Some(admin), ORG))["version"]
                                .as_i64()
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = versions.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=24).collect::<Vec<_>>(), "{versions:?}");
    let v = ok(api_a.get("/api/v1/admin-log/verify", Some(&admin)));
    assert_eq!(
        (v["intact"].as_bool(), v["records"].as_i64()),
        (Some(true), Some(25)),
        "{v}"
    );
    let fetched = ok(api_a.get("/api/v1/policy/org", Some(&admin)));
    assert_eq!(fetched.as_array().unwrap().len(), 24);
}

on_both!(the_org_decides_what_teams_may_allow);
fn the_org_decides_what_teams_may_allow(store: Store) {
    let s = start(store, "delegation");
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let org = format!("{ORG}\n[delegate]\nteam = [\"network\"]\n");
    ok(api.text("PUT", "/api/v1/policy/org", Some(&admin), &org));
    // An exec allow is not the team's to add: refused at its line.
    let exec = "layer = \"team\"\n\n[[exec]]\naction = \"allow\"\ncommands = [\"curl\"]\n";
    let (c, body) = status(api.text("PUT", "/api/v1/policy/teams/web", Some(&admin), exec));
    assert_eq!(
        (c, body["line"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(3)),
        "{body}"
    );
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("team policy may not allow `exec`"), "{e}");
    assert!(
        e.contains("the org policy:9"),
        "names the org's [delegate] line: {e}"
    );
    assert_eq!(
        ok(api.text("PUT", "/api/v1/policy/teams/web", Some(&admin), TEAM))["version"],
        1
    );
    // An org policy that stops delegating what a team allows would strand
    // that team's machines: refused until the team changes.
    let narrower = format!("{ORG}\n[delegate]\nteam = []\n");
    let (c, body) = status(api.text("PUT", "/api/v1/policy/org", Some(&admin), &narrower));
    assert_eq!(c, StatusCode::CONFLICT, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.contains("team `web`'s policy (version 1)") && e.contains("line 3"),
        "{e}"
    );
    let history = ok(api.get("/api/v1/policy/org", Some(&admin)));
    assert_eq!(
        history.as_array().unwrap().len(),
        1,
        "the refused push is no version"
    );
}

/// `sslmode=require`: TLS, the database's certificate checked against the
/// given CA; without that CA, the connection is refused, not downgraded.
#[test]
fn postgres_over_tls_checks_the_certificate() {
    let url = format!(
        "{} sslmode=require",
        database(Store::Postgres, "tls").unwrap()
    );
    let config = |ca: Option<std::path::PathBuf>| sbx_server::Config {
        data: std::env::temp_dir().join("unused"),
        database: Some(url.clone()),
        database_ca: ca,
        bundle_ttl: Duration::from_secs(3600),
        public_url: "http://127.0.0.1:1".into(),
        per_token_per_minute: 10,
        refusal_burst: Default::default(),
        siem: Default::default(),
    };
    let Err(e) = sbx_server::open(config(None)) else {
        panic!("a certificate from an unknown CA was accepted")
    };
    let e = format!("{e:#}");
    assert!(e.contains("certificate"), "{e}");
    let opened = sbx_server::open(config(Some(sbx_server::testing::postgres_ca()))).unwrap();
    assert!(opened.setup_token.is_some());
    assert_eq!(opened.state.db.kind(), "postgres");
}
