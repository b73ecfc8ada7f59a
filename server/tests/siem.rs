//! SIEM delivery: every record a machine ships reaches a syslog receiver
//! over TLS (RFC 5424 in RFC 5425 frames) and an OTLP/HTTP collector, with
//! its fields as structured data and attributes; with a receiver down,
//! nothing is lost: delivery resumes where it stopped once it is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[macro_use]
mod common;

use common::receiver::{wait_for, Receiver, SyslogReceiver};
use common::*;

/// Waits up to 15 s for `got` to hold at least `n` messages.
fn wait_messages(got: &Arc<Mutex<Vec<String>>>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = got.lock().unwrap().clone();
        if now.len() >= n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The OTLP log records the collector got, in order.
fn log_records(got: &[common::receiver::Got]) -> Vec<Value> {
    got.iter()
        .flat_map(|g| {
            let v: Value = serde_json::from_str(&g.body).unwrap();
            v["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect()
}

fn attribute<'a>(record: &'a Value, key: &str) -> &'a Value {
    record["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map_or(&Value::Null, |a| &a["value"])
}

on_both!(records_reach_syslog_and_otlp_and_survive_an_outage);
fn records_reach_syslog_and_otlp_and_survive_an_outage(store: Store) {
    let certs = tempfile::tempdir().unwrap();
    let ca = sbx_server::testing::localhost_certificates(certs.path()).unwrap();
    let syslog_got = Arc::new(Mutex::new(Vec::new()));
    let mut syslog = SyslogReceiver::start("127.0.0.1:0", certs.path(), syslog_got.clone());
    let otlp_got = Arc::new(Mutex::new(Vec::new()));
    let mut otlp = Receiver::start("127.0.0.1:0", otlp_got.clone());
    let (syslog_addr, otlp_addr) = (syslog.addr, otlp.addr);
    let s = start_configured(database(store, "siem"), |c| {
        c.siem = sbx_server::siem::Siem {
            syslog: Some(syslog_addr.to_string()),
            syslog_ca: Some(ca.clone()),
            otlp: Some(format!("http://{otlp_addr}/v1/logs")),
        }
    });
    let api = Api::new(&s);
    let admin = first_admin(&api);
    add_team(&api, &admin, "web");
    let bob = add_person(&api, &admin, "bob@acme.example", "member", Some("web"));
    let machine = sign_in_machine(&api, &bob, "bob-laptop");

    ship(
        &api,
        &machine,
        "s-1",
        &[
            ("network", "connect", "paste.test:443"),
            ("files", "write", "/workspace/.env"),
        ],
    );
    let messages = wait_messages(&syslog_got, 2);
    assert_eq!(messages.len(), 2, "{messages:?}");
    let m = &messages[0];
    // log audit (13), warning (4): a refusal.
    assert!(m.starts_with("<108>1 "), "{m}");
    for part in [
        " bob-laptop sbx - ",
        "machine=\"bob-laptop\" session=\"s-1\" seq=\"1\" user=\"bob@acme.example\" team=\"web\" surface=\"network\" decision=\"deny\" rule=\"no-secrets-to-paste\" resource=\"paste.test:443\"]",
    ] {
        assert!(m.contains(part), "{part} in {m}");
    }
    // The message is the record's line, hash and all: checkable as shipped.
    let line = &m[m.find("] {").unwrap() + 2..];
    sbx_audit::check_line(line).unwrap();

    let records = log_records(&wait_for(&otlp_got, "/v1/logs", 1, 15));
    assert_eq!(records.len(), 2, "{records:?}");
    let r = &records[1];
    assert_eq!(r["severityText"], "WARN");
    assert_eq!(
        attribute(r, "sbx.resource")["stringValue"],
        "/workspace/.env"
    );
    assert_eq!(
        attribute(r, "user.email")["stringValue"],
        "bob@acme.example"
    );
    assert_eq!(attribute(r, "sbx.seq")["intValue"], "2");
    sbx_audit::check_line(r["body"]["stringValue"].as_str().unwrap()).unwrap();

    // Both down: records wait; back up, they arrive, none lost.
    syslog.stop();
    otlp.stop();
    ship(
        &api,
        &machine,
        "s-2",
        &[("network", "connect", "a.test:443"); 3],
    );
    // Each sink has tried and failed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = ok(api.get("/api/v1/siem", Some(&admin)));
        let failed = status["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["last_error"].is_string());
        if failed || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let sinks = status["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 2, "{status}");
    assert!(
        sinks
            .iter()
            .all(|k| k["pending"] == 3 && k["delivered"] == 2),
        "{status}"
    );
    assert!(
        sinks.iter().all(|k| k["last_error"].is_string()),
        "{status}"
    );
    let _syslog = SyslogReceiver::start(&syslog_addr.to_string(), certs.path(), syslog_got.clone());
    let _otlp = Receiver::start(&otlp_addr.to_string(), otlp_got.clone());
    let messages = wait_messages(&syslog_got, 5);
    let sessions: Vec<bool> = messages
        .iter()
        .map(|m| m.contains("session=\"s-2\""))
        .collect();
    assert_eq!(sessions, [false, false, true, true, true], "{messages:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while log_records(&otlp_got.lock().unwrap()).len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(log_records(&otlp_got.lock().unwrap()).len(), 5);
    let status = ok(api.get("/api/v1/siem", Some(&admin)));
    assert!(
        status["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["pending"] == 0 && k["delivered"] == 5 && k["last_error"].is_null()),
        "{status}"
    );
    // Only those who see every record see where they go.
    let r = api.get("/api/v1/siem", Some(&bob));
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);
}
