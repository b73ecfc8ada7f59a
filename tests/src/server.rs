//! An `sbx-server` for the tests, in this process on the loopback: started
//! (again on the same address and data, to come back after an outage),
//! stopped, and called as a person would with a token.
//!
//! Its data is in SQLite, or with `SBX_TEST_DATABASE=postgres` in a
//! PostgreSQL database of the test process's own (one per data directory,
//! so a restart finds what it left).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The PostgreSQL database for `data` when the tests run on PostgreSQL.
fn database(data: &Path) -> Option<String> {
    match std::env::var("SBX_TEST_DATABASE").as_deref() {
        Ok("postgres") => Some(sbx_server::testing::postgres_database(
            &data.display().to_string(),
        )),
        Ok("") | Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("SBX_TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

impl Server {
    /// A server on a free port; also its setup token (empty if not fresh).
    pub fn start(data: &Path, ttl: Duration) -> (Server, String) {
        Server::start_at(data, ttl, "127.0.0.1:0")
    }

    /// The same, on `addr` (to come back where machines expect it).
    pub fn start_at(data: &Path, ttl: Duration, addr: &str) -> (Server, String) {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let opened = sbx_server::open(sbx_server::Config {
            data: data.to_path_buf(),
            database: database(data),
            database_ca: None,
            bundle_ttl: ttl,
            public_url: url.clone(),
            per_token_per_minute: 1200,
            refusal_burst: Default::default(),
            siem: Default::default(),
        })
        .unwrap();
        let setup = opened.setup_token.clone().unwrap_or_default();
        let (tx, thread) = sbx_server::testing::serve_in_thread(opened.state, listener);
        (
            Server {
                url,
                stop: Some(tx),
                thread: Some(thread),
            },
            setup,
        )
    }

    /// Stops it and waits until it no longer listens.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The first org admin, `root@acme.example`, made with the setup
    /// token; returns their token.
    pub fn first_admin(&self, setup: &str) -> String {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}/api/v1/setup", self.url))
            .json(&serde_json::json!({"setup_token": setup, "email": "root@acme.example"}))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "setup: {}", r.status());
        let v: Value = r.json().unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// `method path` with `token`; `body` a JSON value, or text as a string.
    /// The answer must be a success.
    pub fn call(&self, method: &str, path: &str, token: &str, body: Value) -> Value {
        let c = reqwest::blocking::Client::new();
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = c
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(token);
        r = match body {
            Value::String(s) => r.body(s),
            other => r.json(&other),
        };
        let r = r.send().unwrap();
        let status = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }
}
