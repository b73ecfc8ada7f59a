//! Alerts: an exfiltration attempt, a rug pull and a tampered log each
//! raise one, delivered to webhooks within seconds with a signed body; a
//! receiver that is down gets it once it is back, exactly once; alerts are
//! listed and acknowledged by role.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

#[macro_use]
mod common;

use common::receiver::{header, wait_for, Receiver};
use common::*;

on_both!(alerts_reach_webhooks_signed_and_once_through_an_outage);
fn alerts_reach_webhooks_signed_and_once_through_an_outage(store: Store) {
    let s = start(store, "alerts");
    let api = Api::new(&s);
    let admin = first_admin(&api);
    for t in ["web", "data"] {
        ok(api.json("POST", "/api/v1/teams", Some(&admin), json!({"name": t})));
    }
    let bob = add_person(&api, &admin, "bob@acme.example", "member", Some("web"));
    let alice = add_person(
        &api,
        &admin,
        "alice@acme.example",
        "team-admin",
        Some("web"),
    );
    let carol = add_person(
        &api,
        &admin,
        "carol@acme.example",
        "team-admin",
        Some("data"),
    );
    let machine = sign_in_machine(&api, &bob, "bob-laptop");

    let got = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Receiver::start("127.0.0.1:0", got.clone());
    let base = format!("http://{}", receiver.addr);
    let (c, body) = status(api.json(
        "POST",
        "/api/v1/webhooks",
        Some(&alice),
        json!({"url": format!("{base}/json")}),
    ));
    assert_eq!(
        c,
        StatusCode::FORBIDDEN,
        "only org admins add webhooks: {body}"
    );
    let hook = ok(api.json(
        "POST",
        "/api/v1/webhooks",
        Some(&admin),
        json!({"url": format!("{base}/json")}),
    ));
    let secret = hook["secret"].as_str().unwrap().to_string();
    ok(api.json(
        "POST",
        "/api/v1/webhooks",
        Some(&admin),
        json!({"url": format!("{base}/slack"), "format": "slack"}),
    ));

    // An exfiltration attempt: both webhooks within 5 s, the JSON one signed.
    let shipped_at = Instant::now();
    let r = ship(
        &api,
        &machine,
        "s-1",
        &[
            ("net", "connect", "api.web.example:443"),
            (
                "credential",
                "exfiltration",
                "secret GITHUB_TOKEN to paste.test",
            ),
        ],
    );
    assert_eq!(r["alerts"], 1, "{r}");
    let json_hook = wait_for(&got, "/json", 1, 5);
    let slack_hook = wait_for(&got, "/slack", 1, 5);
    let took = shipped_at.elapsed();
    assert_eq!(
        (json_hook.len(), slack_hook.len()),
        (1, 1),
        "after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let g = &json_hook[0];
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(g.body.as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(header(g, "x-sbx-signature"), format!("sha256={want}"));
    let alert: Value = serde_json::from_str(&g.body).unwrap();
    assert_eq!(
        (
            alert["alert"]["kind"].as_str(),
            alert["alert"]["machine"].as_str(),
            alert["alert"]["seq"].as_i64(),
            alert["alert"]["user"].as_str()
        ),
        (
            Some("exfiltration"),
            Some("bob-laptop"),
            Some(2),
            Some("bob@acme.example")
        )
    );
    let slack: Value = serde_json::from_str(&slack_hook[0].body).unwrap();
    assert!(
        slack["text"].as_str().unwrap().contains("exfiltration"),
        "{slack}"
    );

    // The receiver is down: the rug pull's delivery fails and is retried;
    // once the receiver is back it arrives, once.
    receiver.stop();
    let r = ship(
        &api,
        &machine,
        "s-2",
        &[("mcp", "tool_changed", "github.create_issue")],
    );
    assert_eq!(r["alerts"], 1, "{r}");
    std::thread::sleep(Duration::from_secs(3));
    let hooks = ok(api.get("/api/v1/webhooks", Some(&admin)));
    let json_stats = &hooks[0];
    assert!(
        json_stats["pending"] == 1 && json_stats["attempts"].as_i64().unwrap() >= 2,
        "{hooks}"
    );
    let receiver = Receiver::start(&receiver.addr.to_string(), got.clone());
    let json_hook = wait_for(&got, "/json", 2, 20);
    assert_eq!(json_hook.len(), 2, "the retried delivery did not arrive");
    let second: Value = serde_json::from_str(&json_hook[1].body).unwrap();
    assert_eq!(second["alert"]["kind"], "rug-pull");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(wait_for(&got, "/json", 3, 0).len(), 2, "delivered twice");
    let hooks = ok(api.get("/api/v1/webhooks", Some(&admin)));
    assert_eq!(
        (hooks[0]["delivered"].as_i64(), hooks[0]["pending"].as_i64()),
        (Some(2), Some(0))
    );
    drop(receiver);

    // Listed by role; acknowledged by the team's admin, not another team's.
    let listed = ok(api.get("/api/v1/alerts", Some(&alice)));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(
        ok(api.get("/api/v1/alerts", Some(&carol)))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let id = listed[0]["id"].as_i64().unwrap();
    let path = format!("/api/v1/alerts/{id}/ack");
    assert_eq!(
        status(api.json("POST", &path, Some(&carol), json!({}))).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(api.json("POST", &path, Some(&bob), json!({}))).0,
        StatusCode::FORBIDDEN
    );
    ok(api.json("POST", &path, Some(&alice), json!({})));
    let listed = ok(api.get("/api/v1/alerts", Some(&admin)));
    assert_eq!(listed[0]["acked_by"], "alice@acme.example", "{listed}");

    // On the dashboard: both, the exfiltration one still to acknowledge.
    let (cookie, csrf) = sign_in(&s.url, &alice);
    let (c, page) = get_page(&s.url, "/ui/alerts", &cookie);
    assert_eq!(c, StatusCode::OK);
    assert!(
        page.contains("rug-pull") && page.contains("seen by alice@acme.example"),
        "{page}"
    );
    assert!(
        page.contains("exfiltration") && page.contains("Acknowledge"),
        "{page}"
    );
    let other = listed[1]["id"].as_i64().unwrap();
    let r = bare()
        .post(format!("{}/ui/alerts/{other}/ack", s.url))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let listed = ok(api.get("/api/v1/alerts", Some(&admin)));
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["acked_by"] == "alice@acme.example"));
}

on_both!(a_tampered_log_raises_an_alert);
fn a_tampered_log_raises_an_alert(store: Store) {
    let s = start(store, "alerts_tampered");
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let bob = add_person(&api, &admin, "bob@acme.example", "member", Some("web"));
    let machine = sign_in_machine(&api, &bob, "bob-laptop");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let log = sbx_audit::AuditLog::open(
        &path,
        sbx_audit::Identity::current("s-3"),
        Duration::from_millis(10),
    )
    .unwrap();
    for i in 0..3 {
        log.record(sbx_audit::Entry::session_stop("s-3", json!({ "i": i })))
            .unwrap();
    }
    log.close().unwrap();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"i\":1", "\"i\":7");
    let r = ok(api
        .req("POST", "/api/v1/audit", Some(&machine))
        .body(text)
        .send()
        .unwrap());
    // Record 2 was edited, so it is not taken, and record 3 follows a gap.
    assert_eq!(r["flagged"], 2, "{r}");
    let alerts = ok(api.get("/api/v1/alerts", Some(&admin)));
    let alerts = alerts.as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(alerts
        .iter()
        .all(|a| a["kind"] == "log-tampered" && a["seq"] == 2));
    let summaries: Vec<&str> = alerts
        .iter()
        .map(|a| a["summary"].as_str().unwrap())
        .collect();
    assert!(
        summaries[1].starts_with("edited:") && summaries[0].starts_with("gap:"),
        "{summaries:?}"
    );
}

/// The alerts of `kind`, as the admin sees them.
fn alerts_of(api: &Api<'_>, admin: &str, kind: &str) -> Vec<Value> {
    let all = ok(api.get("/api/v1/alerts", Some(admin)));
    all.as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .cloned()
        .collect()
}

on_both!(a_burst_of_refusals_raises_one_alert_per_window);
fn a_burst_of_refusals_raises_one_alert_per_window(store: Store) {
    let s = start_configured(database(store, "alerts_burst"), |c| {
        c.refusal_burst = sbx_server::RefusalBurst {
            count: 4,
            window: Duration::from_secs(600),
        }
    });
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let bob = add_person(&api, &admin, "bob@acme.example", "member", Some("web"));
    let machine = sign_in_machine(&api, &bob, "bob-laptop");
    let refusal = ("network", "connect", "evil.example:443");
    let r = ship(&api, &machine, "s-1", &[refusal; 3]);
    assert_eq!(r["alerts"], 0, "{r}");
    assert!(alerts_of(&api, &admin, "refusals").is_empty());
    // The fourth within the window: one alert, naming the person.
    let r = ship(&api, &machine, "s-2", &[refusal]);
    assert_eq!(r["alerts"], 1, "{r}");
    let raised = alerts_of(&api, &admin, "refusals");
    assert_eq!(raised.len(), 1, "{raised:?}");
    let a = &raised[0];
    assert_eq!(a["user"], "bob@acme.example");
    assert_eq!(
        (a["session"].as_str(), a["seq"].as_i64()),
        (Some("s-2"), Some(1))
    );
    assert!(
        a["summary"]
            .as_str()
            .unwrap()
            .starts_with("4 refusals for bob@acme.example"),
        "{a}"
    );
    // More in the same window add none.
    ship(&api, &machine, "s-3", &[refusal; 5]);
    assert_eq!(alerts_of(&api, &admin, "refusals").len(), 1);
}

on_both!(a_machine_silent_past_its_bundle_raises_one_alert_per_silence);
fn a_machine_silent_past_its_bundle_raises_one_alert_per_silence(store: Store) {
    let s = start_configured(database(store, "alerts_silent"), |c| {
        c.bundle_ttl = Duration::from_secs(2)
    });
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let bob = add_person(&api, &admin, "bob@acme.example", "member", Some("web"));
    let machine = sign_in_machine(&api, &bob, "bob-laptop");
    api.get("/api/v1/me", Some(&machine));
    let wait = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let found = alerts_of(&api, &admin, "silent");
            if found.len() >= n || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let found = wait(1);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["machine"], "bob-laptop");
    assert_eq!(found[0]["team"], "web");
    assert!(
        found[0]["summary"]
            .as_str()
            .unwrap()
            .contains("has not reached the server since"),
        "{found:?}"
    );
    // Still silent: still one alert.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(alerts_of(&api, &admin, "silent").len(), 1);
    // Heard from, then silent again: a second.
    api.get("/api/v1/me", Some(&machine));
    assert_eq!(wait(2).len(), 2);
}
