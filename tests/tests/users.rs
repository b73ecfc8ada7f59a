//! A user's sessions are theirs alone: another user of the same machine
//! can neither list them, nor exec into them, nor connect to their
//! sockets, nor read their audit logs, and cannot make sbx use a runtime
//! directory they prepared in a shared /tmp. The test runs as root and
//! plays the users with setpriv; `cargo xtask test` runs it so (the rest
//! of the suite runs as an ordinary user, uid 1000, whose group may use
//! /dev/kvm).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sbx_tests::{output_within, require_real_kvm, sbx_bin, text, SBX_TIMEOUT};

/// The suite's user (its group may use /dev/kvm) and two others.
const OWNER: u32 = 1000;
const OTHER: u32 = 1001;
const SQUATTED: u32 = 1002;

struct User {
    uid: u32,
    home: PathBuf,
    /// A group beside their own (/dev/kvm's, for the owner).
    group: Option<u32>,
}

impl User {
    /// A user with a home of their own under `base`, which other users may
    /// enter, so that only sbx's own directories keep them out.
    fn new(base: &Path, uid: u32) -> User {
        let home = base.join(format!("home-{uid}"));
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Sessions share the directory they start in: not the home itself.
        let project = home.join("project");
        std::fs::create_dir(&project).unwrap();
        std::os::unix::fs::chown(&project, Some(uid), Some(uid)).unwrap();
        User {
            uid,
            home,
            group: None,
        }
    }

    /// Runs `program` as this user, with sbx's defaults: no SBX_* or XDG
    /// directories, so sessions go where they would on a real machine.
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.uid));
        match self.group {
            Some(g) => c.arg(format!("--groups={g}")),
            None => c.arg("--clear-groups"),
        };
        c.arg(program)
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(self.home.join("project"));
        for k in ["SBX_KERNEL", "SBX_INITRD"] {
            if let Some(v) = std::env::var_os(k) {
                c.env(k, v);
            }
        }
        c
    }

    fn sbx(&self, args: &[&str]) -> Output {
        self.sbx_env(args, &[])
    }

    fn sbx_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut c = self.cmd(&sbx_bin());
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        output_within(&mut c, SBX_TIMEOUT)
    }

    fn runtime_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("sbx-{}", self.uid))
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn another_user_cannot_reach_a_users_sessions() {
    require_real_kvm();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // `cargo xtask test` runs this binary as root in the nested host;
        // an ordinary user's run of the suite cannot play other users.
        eprintln!("skipped: this test plays three users with setpriv and needs root");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut owner = User::new(base.path(), OWNER);
    // The owner may use /dev/kvm as its group may (in the nested test host
    // that group is the owner's own).
    let kvm_group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata("/dev/kvm").unwrap());
    owner.group = (kvm_group != 0).then_some(kvm_group);
    let other = User::new(base.path(), OTHER);
    let squatted = User::new(base.path(), SQUATTED);
    for u in [&owner, &other, &squatted] {
        let _ = std::fs::remove_dir_all(u.runtime_dir());
    }
    ok(
        owner.sbx(&["start", "--name", "mine"]),
        "the owner starts a session",
    );
    let cleanup = Cleanup(&owner);

    // The owner sees and uses it.
    let listed = ok(owner.sbx(&["ls", "--json"]), "the owner lists");
    assert!(listed.contains("\"mine\""), "{listed}");
    assert_eq!(
        ok(
            owner.sbx(&["exec", "mine", "--", "echo", "hi"]),
            "the owner execs"
        ),
        "hi\n"
    );

    // Another user does not see it, even pointed at the owner's directory.
    let listed = ok(other.sbx(&["ls", "--json"]), "another user lists");
    assert!(!listed.contains("mine"), "{listed}");
    let rt = owner.runtime_dir();
    let out = other.sbx_env(&["exec", "mine", "--", "true"], &[("SBX_RUNTIME_DIR", &rt)]);
    assert!(
        !out.status.success(),
        "another user ran a command in the session"
    );
    let out = other.sbx_env(&["ls"], &[("SBX_RUNTIME_DIR", &rt)]);
    assert!(
        !text(&out.stdout).contains("mine"),
        "another user listed the session: {}",
        text(&out.stdout)
    );
    // Nor can they reach its sockets or its files directly.
    let mode = std::fs::metadata(&rt).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", rt.display());
    let socket = rt.join("mine/ctl.sock");
    assert!(socket.exists(), "{}", socket.display());
    let out = other
        .cmd(Path::new("/usr/bin/python3"))
        .args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
        ])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "another user connected to the control socket"
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    let log = owner.home.join(".local/state/sbx/audit/mine.jsonl");
    assert!(log.exists(), "{}", log.display());
    let out = other.cmd(Path::new("/bin/cat")).arg(&log).output().unwrap();
    assert!(!out.status.success(), "another user read the audit log");
    let state = owner.home.join(".local/state/sbx");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", state.display());

    // A runtime directory another user made first is refused, by name.
    let squat = squatted.runtime_dir();
    std::fs::create_dir(&squat).unwrap();
    std::os::unix::fs::chown(&squat, Some(OTHER), Some(OTHER)).unwrap();
    std::fs::set_permissions(&squat, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = squatted.sbx(&["start", "--name", "trap"]);
    assert!(
        !out.status.success(),
        "sbx used a directory another user made"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&squat.display().to_string()) && err.contains("belongs to uid 1001"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&squat);

    drop(cleanup);
}

/// Stops the owner's session however the test ends.
struct Cleanup<'a>(&'a User);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.sbx(&["rm", "-f", "mine"]);
        let _ = std::fs::remove_dir_all(self.0.runtime_dir());
    }
}
