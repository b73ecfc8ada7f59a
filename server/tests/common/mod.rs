//! What the server's tests share: a server on the loopback on either
//! database, a client that speaks its API, and the policies they push.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::Value;

pub mod browser;
pub mod receiver;

pub struct Server {
    pub url: String,
    pub setup: String,
    pub db: sbx_server::db::Db,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Where the server keeps its data: the suite runs on both.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// The database `test` uses on `store`: None for SQLite (a file in the
/// data directory), a database of its own on the tests' PostgreSQL.
pub fn database(store: Store, test: &str) -> Option<String> {
    match store {
        Store::Sqlite => None,
        Store::Postgres => Some(sbx_server::testing::postgres_database(test)),
    }
}

pub fn start(store: Store, test: &str) -> Server {
    start_with(database(store, test), 1200)
}

/// An instance on `database`, with `per_token` requests a minute allowed.
pub fn start_with(database: Option<String>, per_token: u32) -> Server {
    start_configured(database, |c| c.per_token_per_minute = per_token)
}

/// An instance on `database`, its configuration changed by `change`.
pub fn start_configured(
    database: Option<String>,
    change: impl FnOnce(&mut sbx_server::Config),
) -> Server {
    // The server's HTTP client brings no TLS provider of its own (it is
    // given egress's); the tests' clients use ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = sbx_server::Config {
        data: dir.path().join("data"),
        database,
        database_ca: None,
        bundle_ttl: Duration::from_secs(3600),
        public_url: format!("http://{addr}"),
        per_token_per_minute: 1200,
        refusal_burst: Default::default(),
        siem: Default::default(),
    };
    change(&mut config);
    let opened = sbx_server::open(config).unwrap();
    let setup = opened.setup_token.clone().unwrap_or_default();
    let db = opened.state.db.clone();
    let (tx, _thread) = sbx_server::testing::serve_in_thread(opened.state, listener);
    Server {
        url: format!("http://{addr}"),
        setup,
        db,
        stop: Some(tx),
        _dir: dir,
    }
}

/// Runs the test function `$name(Store)` on SQLite and on PostgreSQL, as
/// `$name::sqlite` and `$name::postgres`.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Store::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name(super::Store::Postgres)
            }
        }
    };
}

pub struct Api<'a> {
    pub s: &'a Server,
    pub c: Client,
}

impl<'a> Api<'a> {
    pub fn new(s: &'a Server) -> Api<'a> {
        Api {
            s,
            c: Client::new(),
        }
    }
}

/// Makes team `name` as `admin`.
pub fn add_team(api: &Api<'_>, admin: &str, name: &str) {
    ok(api.json(
        "POST",
        "/api/v1/teams",
        Some(admin),
        serde_json::json!({ "name": name }),
    ));
}

impl Api<'_> {
    pub fn req(
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
    pub fn json(&self, method: &str, path: &str, token: Option<&str>, body: Value) -> Response {
        self.req(method, path, token).json(&body).send().unwrap()
    }
    pub fn text(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Response {
        self.req(method, path, token)
            .body(body.to_string())
            .send()
            .unwrap()
    }
    pub fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.req("GET", path, token).send().unwrap()
    }
}

pub fn ok(r: Response) -> Value {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

pub fn status(r: Response) -> (StatusCode, Value) {
    let s = r.status();
    (s, r.json().unwrap_or(Value::Null))
}

pub const ORG: &str = "layer = \"org\"\n\n[[network]]\nid = \"no-pastebin\"\naction = \"deny\"\nto = [\"pastebin.com\"]\n";
pub const TEAM: &str = "layer = \"team\"\n\n[[network]]\nid = \"web-api\"\naction = \"allow\"\nto = [\"api.web.example\"]\nports = [443]\n";

/// The first org admin's token.
pub fn first_admin(api: &Api<'_>) -> String {
    let admin = ok(api.json(
        "POST",
        "/api/v1/setup",
        None,
        serde_json::json!({"setup_token": api.s.setup, "email": "root@acme.example"}),
    ));
    admin["token"].as_str().unwrap().to_string()
}

/// A new person's first token, made by `admin`.
pub fn add_person(
    api: &Api<'_>,
    admin: &str,
    email: &str,
    role: &str,
    team: Option<&str>,
) -> String {
    ok(api.json(
        "POST",
        "/api/v1/users",
        Some(admin),
        serde_json::json!({"email": email, "role": role, "team": team}),
    ))["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Signs machine `machine` in as the person with `token` (the device flow
/// `sbx login` runs); its token.
pub fn sign_in_machine(api: &Api<'_>, token: &str, machine: &str) -> String {
    let code = ok(api.json(
        "POST",
        "/api/v1/device/code",
        None,
        serde_json::json!({"machine": machine}),
    ));
    ok(api.json(
        "POST",
        "/api/v1/device/approve",
        Some(token),
        serde_json::json!({"user_code": code["user_code"]}),
    ));
    ok(api.json(
        "POST",
        "/api/v1/device/token",
        None,
        serde_json::json!({"device_code": code["device_code"]}),
    ))["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A client that keeps no cookies and follows no redirects: each request
/// says what it carries.
pub fn bare() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in at `/ui/signin` with `token`: the cookie and the CSRF token.
pub fn sign_in(url: &str, token: &str) -> (String, String) {
    let r = bare()
        .post(format!("{url}/ui/signin"))
        .form(&[("token", token)])
        .send()
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SEE_OTHER, "sign-in");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = get_page(url, "/ui/sessions", &cookie).1;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    (cookie, csrf)
}

pub fn get_page(url: &str, path: &str, cookie: &str) -> (reqwest::StatusCode, String) {
    let r = bare()
        .get(format!("{url}{path}"))
        .header("cookie", cookie)
        .send()
        .unwrap();
    (r.status(), r.text().unwrap())
}

/// The id of `token` itself, as `GET /api/v1/tokens` lists it.
pub fn token_id(api: &Api<'_>, token: &str) -> i64 {
    ok(api.get("/api/v1/tokens", Some(token)))
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["current"] == true)
        .unwrap()["id"]
        .as_i64()
        .unwrap()
}

/// Ships a session's records from a log made by sbx's own audit log, with
/// the records `events` describe.
pub fn ship(api: &Api<'_>, machine: &str, session: &str, events: &[(&str, &str, &str)]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let log = sbx_audit::AuditLog::open(
        &path,
        sbx_audit::Identity {
            session: session.into(),
            user: "bob@acme.example".into(),
            host: "bob-laptop".into(),
        },
        Duration::from_millis(10),
    )
    .unwrap();
    for (surface, action, resource) in events {
        log.append(
            sbx_audit::Category::Decision,
            sbx_audit::Event {
                surface: Some(surface.to_string()),
                action: action.to_string(),
                resource: resource.to_string(),
                decision: Some("deny".into()),
                rule_id: Some("no-secrets-to-paste".into()),
                reason: Some("the org keeps secrets to their own hosts".into()),
                ..Default::default()
            },
        )
        .unwrap();
    }
    log.close().unwrap();
    let r = api
        .req("POST", "/api/v1/audit", Some(machine))
        .body(std::fs::read_to_string(&path).unwrap())
        .send()
        .unwrap();
    ok(r)
}
