//! A real filter in a real process: a thread that calls outside its list
//! stops there, the reporter names the thread and the call, and the
//! process ends with SIGSYS's status. The scenario runs in a child process
//! (this test binary again), since it ends the process it runs in.

use std::process::Command;

use sbx_seccomp::{Kind, Mode};

const CHILD: &str = "SBX_SECCOMP_TEST_CHILD";

fn child_scenario() {
    let out = std::env::var("SBX_SECCOMP_TEST_OUT").unwrap();
    sbx_seccomp::enable(Mode::Enforce, move |v| {
        std::fs::write(
            &out,
            format!("{}|{}|{}|{}", v.thread, v.kind, v.syscall, v.number),
        )
        .unwrap();
    })
    .unwrap();
    sbx_seccomp::start_spawner().unwrap();
    // A thread that stays within its list keeps running, filtered.
    let (tx, rx) = std::sync::mpsc::channel();
    sbx_seccomp::spawn("well-behaved", Kind::Audit, move || {
        let mode = std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
            .unwrap();
        tx.send(mode).unwrap();
    })
    .unwrap()
    .join()
    .unwrap();
    assert_eq!(rx.recv().unwrap(), "2");
    // One that does not is stopped, and the process ends.
    let _ = sbx_seccomp::spawn("misbehaving", Kind::Block, || {
        // SAFETY: only reads the persona; the filter stops it first.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        unreachable!("the filter let personality through");
    });
    std::thread::sleep(std::time::Duration::from_secs(10));
    panic!("the process was not ended");
}

#[test]
fn a_call_outside_the_list_is_reported_and_ends_the_process() {
    if std::env::var_os(CHILD).is_some() {
        child_scenario();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_call_outside_the_list_is_reported_and_ends_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SBX_SECCOMP_TEST_OUT", &report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{stderr}");
    assert!(
        stderr.contains("block thread `misbehaving` called personality"),
        "{stderr}"
    );
    let report = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        report,
        format!("misbehaving|block|personality|{}", libc::SYS_personality)
    );
}

#[test]
fn without_enable_nothing_is_filtered() {
    let mode = sbx_seccomp::spawn("plain", Kind::Vcpu, || {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("Seccomp:\t0"), "{status}");
    })
    .unwrap()
    .join();
    assert!(mode.is_ok());
}
