//! The log's chain: written, reopened, verified, and tampered with.

use std::path::Path;
use std::time::Duration;

use sbx_audit::{read_records, verify, AuditLog, Category, Cursor, Event, Filter, Identity};

fn event(i: usize) -> Event {
    Event {
        surface: Some(if i.is_multiple_of(2) { "net" } else { "fs" }.into()),
        action: "connect".into(),
        resource: format!("host{i}.example:443"),
        decision: Some(if i.is_multiple_of(3) { "deny" } else { "allow" }.into()),
        ..Event::default()
    }
}

fn write_log(path: &Path, n: usize) {
    let log = AuditLog::open(path, Identity::current("s1"), Duration::from_millis(50)).unwrap();
    for i in 0..n {
        log.append(Category::Decision, event(i)).unwrap();
    }
    log.close().unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn problem(path: &Path) -> String {
    match verify(path).unwrap() {
        Ok(v) => panic!("tampering not detected: {v:?}"),
        Err(p) => p.to_string(),
    }
}

#[test]
fn intact_logs_verify_and_reopened_logs_continue_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit/s1.jsonl");
    write_log(&path, 5);
    write_log(&path, 3);
    let v = verify(&path).unwrap().unwrap();
    assert_eq!(v.records, 8);
    let records = read_records(&path, &mut Cursor::default()).unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(records[7].id, "s1-8");
    assert_eq!(records[7].hash, v.head);
}

#[test]
fn records_are_on_disk_before_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    let log = AuditLog::open(&path, Identity::current("s"), Duration::from_secs(3600)).unwrap();
    log.append(
        Category::Session,
        Event {
            action: "start".into(),
            ..Event::default()
        },
    )
    .unwrap();
    // Not closed, not synced: a reader already sees it.
    assert_eq!(lines(&path).len(), 1);
    let second = AuditLog::open(&path, Identity::current("s"), Duration::from_secs(1));
    assert!(second
        .err()
        .unwrap()
        .to_string()
        .contains("in use by another sbx process"));
}

#[test]
fn an_edited_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    write_log(&path, 6);
    let mut l = lines(&path);
    l[2] = l[2]
        .replace("\"deny\"", "\"allow\"")
        .replace("host2", "host9");
    rewrite(&path, &l);
    let p = problem(&path);
    assert!(p.starts_with("line 3 (record 3, id s1-3): edited"), "{p}");
}

#[test]
fn a_deleted_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    write_log(&path, 6);
    let mut l = lines(&path);
    l.remove(3);
    rewrite(&path, &l);
    let p = problem(&path);
    assert!(
        p.starts_with("line 4 (record 5, id s1-5): record 4 is missing"),
        "{p}"
    );
}

#[test]
fn reordered_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    write_log(&path, 6);
    let mut l = lines(&path);
    l.swap(1, 4);
    rewrite(&path, &l);
    let p = problem(&path);
    assert!(
        p.starts_with(
            "line 2 (record 5, id s1-5): out of order: record 2 should come here but is on line 5"
        ),
        "{p}"
    );
}

#[test]
fn a_rehashed_forgery_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    write_log(&path, 4);
    let mut l = lines(&path);
    // Forge record 2 as someone who knows the format would: continue the
    // chain from the real record 1, so the forgery's own hash and link are
    // valid. Record 3 still points at the original.
    let forged = dir.path().join("forged.jsonl");
    std::fs::write(&forged, format!("{}\n", l[0])).unwrap();
    {
        let log = AuditLog::open(&forged, Identity::current("s1"), Duration::from_secs(1)).unwrap();
        let ev = Event {
            resource: "forged".into(),
            ..event(1)
        };
        log.append(Category::Decision, ev).unwrap();
    }
    l[1] = lines(&forged)[1].clone();
    rewrite(&path, &l);
    let p = problem(&path);
    assert!(
        p.starts_with("line 3 (record 3, id s1-3): its link to the record before it is broken"),
        "{p}"
    );
}

#[test]
fn filters_select_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    write_log(&path, 6);
    let mut end = Cursor::default();
    let records = read_records(&path, &mut end).unwrap();
    let deny = Filter {
        decision: Some("deny".into()),
        ..Filter::default()
    };
    assert_eq!(records.iter().filter(|r| deny.matches(r)).count(), 2);
    let net = Filter {
        surface: Some("net".into()),
        ..Filter::default()
    };
    assert_eq!(records.iter().filter(|r| net.matches(r)).count(), 3);
    let now = time::OffsetDateTime::now_utc();
    let future = Filter {
        since: Some(now + time::Duration::hours(1)),
        ..Filter::default()
    };
    assert_eq!(records.iter().filter(|r| future.matches(r)).count(), 0);
    let recent = Filter {
        since: sbx_audit::parse_time("10m", now),
        ..Filter::default()
    };
    assert_eq!(records.iter().filter(|r| recent.matches(r)).count(), 6);
    let other = Filter {
        session: Some("s2".into()),
        ..Filter::default()
    };
    assert_eq!(records.iter().filter(|r| other.matches(r)).count(), 0);
    // Following from the end finds nothing new, then the next record.
    assert!(read_records(&path, &mut end).unwrap().is_empty());
    write_log(&path, 1);
    assert_eq!(read_records(&path, &mut end).unwrap().len(), 1);
}

#[test]
fn the_sync_thread_leaves_signals_to_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let _log = AuditLog::open(
        &dir.path().join("s.jsonl"),
        Identity::current("s"),
        Duration::from_secs(1),
    )
    .unwrap();
    // Other tests run in parallel: threads come and go, and several logs
    // may be open. Every sync thread that can be read must block them. A new
    // thread names itself once it runs, so look for a while.
    let sync_threads = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "audit-sync")
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut statuses = sync_threads();
    while statuses.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        statuses = sync_threads();
    }
    assert!(!statuses.is_empty(), "the sync thread runs");
    for status in statuses {
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .unwrap()
            .trim();
        let mask = u64::from_str_radix(blocked, 16).unwrap();
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            assert_ne!(
                mask & (1 << (sig - 1)),
                0,
                "signal {sig} not blocked: {blocked}"
            );
        }
    }
}
