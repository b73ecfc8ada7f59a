//! The session process confines itself with Landlock before the guest can
//! reach it: a host file outside what it needs is out of its reach, while
//! its shares, state and audit log are not.

use sbx_tests::{output_within, text, Host, SBX_TIMEOUT};

/// Starts session `name` in `ws` with the confinement probe set to `probe`
/// and returns its `confined` record once it has stopped.
fn confined_record(
    host: &Host,
    ws: &std::path::Path,
    name: &str,
    probe: &std::path::Path,
) -> serde_json::Value {
    let mut start = host.cmd(&["start", "--name", name]);
    start.current_dir(ws).env("SBX_CONFINE_PROBE", probe);
    let out = output_within(&mut start, SBX_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The confined session still works.
    let out = host.sh(name, "cat inside.txt");
    assert_eq!(text(&out.stdout), "in the share\n", "{}", text(&out.stderr));
    host.ok(&["stop", name]);
    host.events(name)
        .into_iter()
        .find(|r| r["action"] == "confined")
        .expect("a confined record")
}

#[test]
fn a_running_session_cannot_read_host_files_outside_what_it_needs() {
    let host = Host::new();
    let ws = host.dir.path().join("project");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("inside.txt"), "in the share\n").unwrap();
    let outside = host.dir.path().join("outside.txt");
    std::fs::write(&outside, "the user's file\n").unwrap();

    let r = confined_record(&host, &ws, "c1", &outside);
    eprintln!("confined: {r}");
    assert!(r["resource"] == "full" || r["resource"] == "partial", "{r}");
    assert!(r["details"]["landlock_abi"].as_u64().unwrap() >= 1, "{r}");
    let outcome = r["details"]["probe"]["outcome"].as_str().unwrap();
    assert!(outcome.contains("Permission denied"), "{outcome}");

    // The same probe of a file in the share reads it: the probe tells.
    let r = confined_record(&host, &ws, "c2", &ws.join("inside.txt"));
    assert_eq!(r["details"]["probe"]["outcome"], "readable", "{r}");
}
