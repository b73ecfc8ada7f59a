//! Sessions driven through the `sandbox` library, as the image builder,
//! the MCP gateway and the control plane will drive them: a spec built in
//! code, started without the CLI, and then used like any other session.

use sandbox::{launch, MountSpec, Selection, SessionSpec};
use sbx_tests::{sbx_bin, text, Host};

#[test]
fn a_session_starts_from_a_spec_built_in_code() {
    let host = Host::new();
    host.adopt();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("hello"), "from the host\n").unwrap();
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("ref"), "read only\n").unwrap();

    let mut spec = SessionSpec::new("from-code", &Selection::default()).unwrap();
    spec.vm.vcpus = 2;
    spec.vm.mem_mib = 320;
    spec.mounts.push(MountSpec::workspace(ws.path()).unwrap());
    spec.mounts.push(MountSpec {
        host: reference.path().canonicalize().unwrap(),
        guest: "/ref".into(),
        read_only: true,
    });
    spec.env.push(("FROM_SPEC".into(), "yes".into()));
    let dir = launch::start(&spec, &sbx_bin(), || {}).unwrap();

    // What the session process ran is the spec, as written.
    assert_eq!(SessionSpec::read(&dir.spec_path()).unwrap(), spec);
    // The CLI sees and drives it like any other session.
    let s = host.session("from-code");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["vcpus"], 2);
    assert_eq!(s["mem_mib"], 320);
    let out = host.sh(
        "from-code",
        "echo $FROM_SPEC; pwd; cat hello /ref/ref; nproc; echo x > /ref/no",
    );
    assert_eq!(
        text(&out.stdout),
        "yes\n/workspace\nfrom the host\nread only\n2\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Read-only"),
        "{}",
        text(&out.stderr)
    );
    // The caller's own -e wins over the spec's environment.
    let out = host.ok(&[
        "exec",
        "from-code",
        "-e",
        "FROM_SPEC=caller",
        "--",
        "sh",
        "-c",
        "echo $FROM_SPEC",
    ]);
    assert_eq!(out, "caller\n");
    host.ok(&["stop", "from-code"]);
    let records = host.events("from-code");
    let mounts = records.iter().filter(|r| r["action"] == "mount").count();
    assert_eq!(mounts, 2, "{records:?}");

    // A second start under the same name is refused, naming what to do.
    let e = launch::start(&spec, &sbx_bin(), || {}).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}
