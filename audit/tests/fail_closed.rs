//! A log that cannot be written stops everything after it. Alone in its own
//! test binary because it lowers the process's file size limit.

use std::time::Duration;

use sbx_audit::{AuditLog, Category, Event, Identity};

#[test]
fn a_full_disk_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.jsonl");
    let log = AuditLog::open(&path, Identity::current("s"), Duration::from_secs(1)).unwrap();
    // SAFETY: ignore SIGXFSZ so that writes past the limit fail with EFBIG,
    // then cap file size at 4 KiB, as a full disk would.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: 4096,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let ev = || Event {
        action: "connect".into(),
        resource: "x".repeat(200),
        ..Event::default()
    };
    let mut ok = 0;
    let err = loop {
        match log.append(Category::Decision, ev()) {
            Ok(_) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok < 100, "the size limit did not apply");
    };
    assert!(ok > 0);
    assert!(err.to_string().contains("failing closed"), "{err}");
    // Later calls fail too, even ones that would fit.
    let small = Event {
        action: "x".into(),
        ..Event::default()
    };
    assert!(log.append(Category::Decision, small).is_err());
    assert!(log.sync().is_err());
}
