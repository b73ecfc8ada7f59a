//! The control plane's API on the loopback, route by route: setup, teams,
//! people and roles, signing a machine in, pushing and fetching policy,
//! revocation, and the requests it must refuse.

use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Server {
    url: String,
    setup: String,
    _dir: tempfile::TempDir,
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let opened = sbx_server::open(sbx_server::Config {
        data: dir.path().join("data"),
        bundle_ttl: Duration::from_secs(3600),
        public_url: format!("http://{addr}"),
    })
    .unwrap();
    let setup = opened
        .setup_token
        .clone()
        .expect("a setup token on a fresh server");
    std::thread::spawn(move || rt.block_on(sbx_server::serve(opened.state, listener)));
    Server {
        url: format!("http://{addr}"),
        setup,
        _dir: dir,
    }
}

struct Api<'a> {
    s: &'a Server,
    c: Client,
}

impl Api<'_> {
    fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::blocking::RequestBuilder {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.c.request(m, format!("{}{path}", self.s.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }
    fn json(&self, method: &str, path: &str, token: Option<&str>, body: Value) -> Response {
        self.req(method, path, token).json(&body).send().unwrap()
    }
    fn text(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Response {
        self.req(method, path, token)
            .body(body.to_string())
            .send()
            .unwrap()
    }
    fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.req("GET", path, token).send().unwrap()
    }
}

fn ok(r: Response) -> Value {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

fn status(r: Response) -> (StatusCode, Value) {
    let s = r.status();
    (s, r.json().unwrap_or(Value::Null))
}

const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"no-pastebin\"\naction = \"deny\"\nto = [\"pastebin.com\"]\n";
const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"web-api\"\naction = \"allow\"\nto = [\"api.web.example\"]\nports = [443]\n";

#[test]
fn the_api_from_setup_to_a_signed_in_machine_fetching_policy() {
    let s = start();
    let api = Api {
        s: &s,
        c: Client::new(),
    };

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
    let admins = ok(api.get("/api/v1/tokens", Some(&admin)));
    let admin_id = admins
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["current"] == true)
        .unwrap()["id"]
        .as_i64()
        .unwrap();
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

#[test]
fn unauthenticated_malformed_and_oversized_requests_are_refused() {
    let s = start();
    let api = Api {
        s: &s,
        c: Client::new(),
    };
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
