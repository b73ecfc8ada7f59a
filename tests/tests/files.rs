//! Shared directories against real guests: data and metadata round trips,
//! git in /workspace, an escape suite, and mounts refused before boot.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use sbx_tests::{run, sha256, text, Host};

/// Enough for many FUSE requests each way. (Each small write is a request
/// of its own, about 5 ms in the nested test host: 100 MiB written by
/// `head` took longer than a command may.)
const FILE_BYTES: u64 = 16 * 1024 * 1024;

#[test]
fn data_metadata_and_git_round_trip() {
    let host = Host::new();
    let ws = host.dir.path().join("project");
    std::fs::create_dir(&ws).unwrap();
    run(Command::new("sh").current_dir(&ws).args([
        "-c",
        "head -c 16777216 /dev/urandom > in.bin && echo stamp > stamp.txt && chmod 640 stamp.txt && touch -d '2001-02-03 04:05:06' stamp.txt",
    ]));
    host.ok_in(&ws, &["start", "--name", "f"]);

    // Host to guest: the same bytes.
    let out = host.sh("f", "sha256sum in.bin");
    let guest_sum = text(&out.stdout);
    assert_eq!(
        guest_sum.split_whitespace().next(),
        Some(sha256(&ws.join("in.bin")).as_str()),
        "{}",
        text(&out.stderr)
    );
    // Guest to host.
    let out = host.sh(
        "f",
        &format!("head -c {FILE_BYTES} /dev/urandom > out.bin && sha256sum out.bin"),
    );
    assert_eq!(
        text(&out.stdout).split_whitespace().next(),
        Some(sha256(&ws.join("out.bin")).as_str()),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(ws.join("out.bin")).unwrap().len(),
        FILE_BYTES
    );

    // Permissions and mtimes, both ways.
    let out = host.sh("f", "stat -c '%a %Y' stamp.txt");
    assert_eq!(
        text(&out.stdout),
        "640 981173106\n",
        "{}",
        text(&out.stderr)
    );
    let out = host.sh(
        "f",
        "echo g > made.txt && chmod 604 made.txt && touch -d '2002-03-04 05:06:07' made.txt",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::metadata(ws.join("made.txt")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o604);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.mtime(), 1015218367);

    // git, start to finish, in /workspace; the host sees the commit.
    let out = host.sh("f",
        "rm in.bin out.bin && git init -q && git add -A && git -c user.name=t -c user.email=t@example.com commit -qm first && git status --porcelain && git log --oneline | wc -l",
    );
    assert_eq!(text(&out.stdout).trim(), "1", "{}", text(&out.stderr));
    let log = run(Command::new("git")
        .current_dir(&ws)
        .args(["log", "--format=%s"]));
    assert_eq!(log, "first\n");
    let status = run(Command::new("git")
        .current_dir(&ws)
        .args(["status", "--porcelain"]));
    assert_eq!(status, "");

    host.ok(&["stop", "f"]);
    // Changes were recorded, coalesced: a few records, not one per write.
    let records = host.events("f");
    let changes: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["action"] == "file_changes")
        .collect();
    assert!(!changes.is_empty() && changes.len() < 10, "{changes:?}");
    let created: Vec<String> = changes
        .iter()
        .flat_map(|r| {
            r["details"]["created"]["paths"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert!(
        created.contains(&"/workspace/out.bin".to_string()),
        "{created:?}"
    );
    let mounts: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["action"] == "mount").collect();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0]["rule_id"], "session-mounts");

    // A big host tree goes with one `rm -r`, which deletes while it lists
    // (in a session of its own: its deletions span several audit records).
    // Over a tmpfs host directory, as the nested test host's, each listing
    // request used to seek the host directory back, and tmpfs counts a
    // seek's offset in entries still present, so entries were skipped and
    // rmdir found the directory not empty.
    let many = ws.join("many");
    for d in ["a", "b"] {
        std::fs::create_dir_all(many.join(d)).unwrap();
        for i in 0..1500 {
            std::fs::write(many.join(d).join(format!("file-{i}")), "x").unwrap();
        }
    }
    host.ok_in(&ws, &["start", "--name", "g"]);
    let out = host.sh("g", "rm -r many && echo removed");
    assert_eq!(text(&out.stdout), "removed\n", "{}", text(&out.stderr));
    assert!(!many.exists(), "the guest's rm -r left files on the host");
    host.ok(&["stop", "g"]);
}

#[test]
fn escapes_fail_and_are_logged() {
    let host = Host::new();
    let base = host.dir.path();
    let ws = base.join("ws");
    let ro = base.join("ro");
    std::fs::create_dir_all(ws.join("sub/dir")).unwrap();
    std::fs::create_dir(&ro).unwrap();
    let secret = base.join("secret.txt");
    std::fs::write(&secret, "HOST-SECRET").unwrap();
    std::fs::write(ws.join(".env"), "ENV-SECRET").unwrap();
    std::fs::write(ro.join("keep.txt"), "keep").unwrap();
    std::os::unix::fs::symlink(&secret, ws.join("host-abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", ws.join("host-rel-link")).unwrap();
    run(Command::new("mkfifo").arg(ws.join("host-fifo")));
    // A device node on the host only root can make; for an ordinary
    // user the attempt below finds nothing, which is as refused.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        run(Command::new("mknod")
            .arg(ws.join("host-null"))
            .args(["c", "1", "3"]));
    }
    let ro_arg = format!("{}:/ro:ro", ro.display());
    host.ok_in(&ws, &["start", "--name", "e", "--mount", &ro_arg]);

    let s = secret.display();
    let attempts: Vec<(&str, String)> = vec![
        ("dotdot", "cat /workspace/../secret.txt; cat ../secret.txt; cd sub/dir && cat ../../../secret.txt".into()),
        ("guest-abs-symlink", format!("ln -s {s} /workspace/l1 && cat /workspace/l1")),
        ("guest-rel-symlink", "ln -s ../secret.txt /workspace/l2 && cat /workspace/l2".into()),
        ("host-symlinks", "cat host-abs-link; cat host-rel-link".into()),
        ("hard-link", "ln /etc/passwd /workspace/hl && cat /workspace/hl".into()),
        ("mknod", "mknod /workspace/mem c 1 1 && head -c 16 /workspace/mem | od".into()),
        ("mkfifo", "mkfifo /workspace/fifo".into()),
        ("host-fifo", "timeout 3 cat host-fifo".into()),
        ("host-device", "head -c 4 host-null | od".into()),
        ("setuid", "cp /bin/busybox /workspace/suid && chmod u+s /workspace/suid".into()),
        ("ro-write", "echo x > /ro/new".into()),
        ("ro-remount-write", "mount -o remount,rw /ro && echo x > /ro/new; rm -f /ro/keep.txt".into()),
        ("denied-read", "cat /workspace/.env".into()),
        ("denied-rename", "mv /workspace/.env /workspace/plain && cat /workspace/plain".into()),
        ("denied-listing", "ls -a /workspace | grep -c env".into()),
        ("rename-race", "mkdir -p r/a/b; (for i in $(seq 200); do mv r/a r/z; mv r/z r/a; done) & for i in $(seq 200); do cat r/a/b/../../../../secret.txt r/z/b/../../../secret.txt 2>/dev/null; done; wait".into()),
    ];
    let mut report = String::new();
    for (name, script) in &attempts {
        let out = host.sh("e", script);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !all.contains("HOST-SECRET") && !all.contains("ENV-SECRET"),
            "{name} leaked a secret: {all}"
        );
        report.push_str(&format!("{name}: exit {:?}: {all}\n", out.status.code()));
        if *name != "host-device" && *name != "denied-listing" && *name != "rename-race" {
            assert_ne!(out.status.code(), Some(0), "{name} succeeded:\n{all}");
        }
    }
    eprintln!("{report}");
    host.ok(&["stop", "e"]);

    // Nothing was made or changed outside what the guest may change.
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST-SECRET");
    assert_eq!(
        std::fs::read_to_string(ro.join("keep.txt")).unwrap(),
        "keep"
    );
    assert!(!ro.join("new").exists());
    for made in ["mem", "fifo", "plain", "hl"] {
        assert!(!ws.join(made).exists(), "{made} was created");
    }
    let suid = std::fs::metadata(ws.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(suid & 0o6000, 0, "setuid bit set: {suid:o}");
    let mut top: Vec<String> = std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["ro", "run", "secret.txt", "state", "ws"]);

    // Each attempt that reached the device is a denial in the audit log,
    // naming its rule.
    let denials: Vec<(String, String, String)> = host
        .events("e")
        .iter()
        .filter(|r| r["decision"] == "deny")
        .map(|r| {
            (
                r["action"].as_str().unwrap_or("").to_string(),
                r["resource"].as_str().unwrap_or("").to_string(),
                r["rule_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let has = |action: &str, path: &str, rule: &str| {
        denials
            .iter()
            .any(|(a, p, r)| a == action && p == path && r == rule)
    };
    assert!(has("mknod", "/workspace/mem", "fs-guard"), "{denials:?}");
    assert!(has("mknod", "/workspace/fifo", "fs-guard"), "{denials:?}");
    assert!(has("chmod", "/workspace/suid", "fs-guard"), "{denials:?}");
    assert!(
        has("lookup", "/workspace/.env", "secret-files"),
        "{denials:?}"
    );
    assert!(
        denials
            .iter()
            .any(|(_, p, r)| p.starts_with("/ro") && r == "session-mounts"),
        "{denials:?}"
    );
}

#[test]
fn denied_mounts_are_refused_before_boot() {
    let host = Host::new();
    let ws = host.dir.path().join("ws");
    let ssh = host.dir.path().join(".ssh");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(&ssh).unwrap();
    let arg = format!("{}:/keys:ro", ssh.display());
    let out = host.sbx_in(&ws, &["start", "--name", "d", "--mount", &arg]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("secret-files") && err.contains(".ssh"),
        "{err}"
    );
    // Refused and audited, and no session is left.
    assert!(!host.runtime().join("d").exists());

    let out = host.sbx_in(&ws, &["start", "--mount", "/no/such/dir:/x"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/no/such/dir"),
        "{}",
        text(&out.stderr)
    );
    let out = host.sbx_in(Path::new("/"), &["start"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("--no-workspace"),
        "{}",
        text(&out.stderr)
    );
}

/// Under the default cache mode the guest keeps names, attributes and data
/// for a minute, yet host edits show within moments: the VMM watches the
/// host and the guest agent revalidates what changed. With `always` (no
/// watch) the same edits stay unseen for the whole minute.
#[test]
fn host_edits_reach_a_caching_guest() {
    let host = Host::new();
    let ws = host.dir.path().join("edits");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    for (name, body) in [
        ("replaced.txt", "old\n"),
        ("in-place.txt", "AAAA\n"),
        ("gone.txt", "here\n"),
        ("sub/grows.txt", "one\n"),
    ] {
        std::fs::write(ws.join(name), body).unwrap();
    }
    host.ok_in(&ws, &["start", "--name", "e"]);
    // The guest caches every name, attribute and byte, and the absence of
    // new.txt; it keeps sub as its working directory (an entry in use).
    let warm =
        "cat replaced.txt in-place.txt gone.txt sub/grows.txt >/dev/null; ls . sub >/dev/null; \
                test ! -e new.txt && test ! -e sub/new.txt && echo warm";
    let out = host.sh("e", warm);
    assert_eq!(text(&out.stdout), "warm\n", "{}", text(&out.stderr));

    // Editors save by replacing the file; others write in place.
    std::fs::write(ws.join("replaced.tmp"), "new\n").unwrap();
    std::fs::rename(ws.join("replaced.tmp"), ws.join("replaced.txt")).unwrap();
    std::fs::write(ws.join("in-place.txt"), "BBBB\n").unwrap();
    std::fs::remove_file(ws.join("gone.txt")).unwrap();
    std::fs::write(ws.join("new.txt"), "hi\n").unwrap();
    std::fs::write(ws.join("sub/new.txt"), "hi\n").unwrap();
    std::fs::write(ws.join("sub/grows.txt"), "one\ntwo\n").unwrap();

    // Polled for 10 s, far inside the minute the guest would otherwise
    // trust its cache; by name only, since a listing would refresh the
    // entries it lists by itself.
    let check = "cd sub; i=0; while [ $i -lt 100 ]; do \
        if [ \"$(cat ../replaced.txt)\" = new ] && [ \"$(cat ../in-place.txt)\" = BBBB ] \
           && [ ! -e ../gone.txt ] && [ \"$(cat ../new.txt)\" = hi ] \
           && [ \"$(cat new.txt)\" = hi ] && [ \"$(cat grows.txt | wc -l)\" = 2 ]; then \
           echo \"seen after $i polls\"; ls . ..; exit 0; fi; \
        sleep 0.1; i=$((i+1)); done; \
        cat ../replaced.txt ../in-place.txt grows.txt; test -e ../gone.txt && echo gone.txt is still there; exit 1";
    let out = host.sh("e", check);
    let said = text(&out.stdout);
    assert!(
        out.status.success(),
        "host edits not seen in 10 s:\n{said}{}",
        text(&out.stderr)
    );
    let listed: Vec<&str> = said.lines().collect();
    assert_eq!(
        listed.iter().filter(|l| **l == "new.txt").count(),
        2,
        "{said}"
    );
    assert!(!listed.contains(&"gone.txt"), "{said}");
    eprintln!("{}", said.lines().next().unwrap_or_default());

    // The guest's own edits still reach the host, and are not echoed back
    // as host edits that would undo its cache.
    let out = host.sh("e", "echo mine > mine.txt && cat mine.txt");
    assert_eq!(text(&out.stdout), "mine\n", "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(ws.join("mine.txt")).unwrap(),
        "mine\n"
    );
    // A host tool that rewrites the file the moment the guest saved it (a
    // formatter, a build) is not taken for the echo of the guest's save.
    std::fs::write(ws.join("mine.txt"), "formatted\n").unwrap();
    let check = "i=0; while [ $i -lt 100 ]; do         [ \"$(cat mine.txt)\" = formatted ] && echo seen && exit 0;         sleep 0.1; i=$((i+1)); done; cat mine.txt; exit 1";
    let out = host.sh("e", check);
    assert!(
        out.status.success(),
        "a host edit right after the guest's own was not seen in 10 s: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    host.ok(&["stop", "e"]);
}

/// The guest resolves symlinks in its own tree, but the host user's tools
/// follow them on the host: a link out of the share is recorded, and
/// refused where a `links = "leaving"` rule says so.
#[test]
fn symlinks_leaving_the_share_are_recorded_or_refused() {
    let host = Host::new();
    let ws = host.dir.path().join("project");
    std::fs::create_dir(&ws).unwrap();
    host.ok_in(&ws, &["start", "--name", "l"]);
    let out = host.sh("l", "ln -s /etc/passwd out && ln -s inside in && echo made");
    assert_eq!(text(&out.stdout), "made\n", "{}", text(&out.stderr));
    host.ok(&["stop", "l"]);
    let records = host.events("l");
    let leaving: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "symlink_out")
        .collect();
    assert_eq!(leaving.len(), 1, "{records:?}");
    assert_eq!(leaving[0]["resource"], "/workspace/out");
    assert_eq!(leaving[0]["details"]["target"], "/etc/passwd");

    let policy = host.dir.path().join("links.toml");
    std::fs::write(
        &policy,
        "[[fs]]\nid = \"no-leaving-links\"\naction = \"deny\"\npaths = [\"**\"]\nlinks = \"leaving\"\n",
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    host.ok_in(&ws, &["start", "--name", "r", "--policy", p]);
    let out = host.sh(
        "r",
        "ln -s ../../etc/shadow up; ln -s ok fine && echo fine made",
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "fine made\n");
    assert!(ws.join("up").symlink_metadata().is_err());
    assert!(ws.join("fine").symlink_metadata().is_ok());
    host.ok(&["stop", "r"]);
    let refused = host
        .events("r")
        .into_iter()
        .find(|r| r["action"] == "symlink" && r["decision"] == "deny")
        .expect("the refusal is recorded");
    assert_eq!(refused["rule_id"], "no-leaving-links");
    assert_eq!(refused["resource"], "/workspace/up");
}
