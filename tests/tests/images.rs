//! Images against real guests: sessions booted from the base image
//! (`cargo xtask image base`, imported by `cargo xtask test` into the
//! suite's store), their disks, and packages fetched through the egress
//! proxy. And `sbx image` itself, with bad input.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use base64::Engine as _;
use sbx_tests::tls::{https_server_with, TestCa};
use sbx_tests::{text, Host};
use sha2::Digest as _;

#[test]
fn the_base_image_is_a_normal_userland_with_an_agent_user() {
    let host = Host::new();
    let out = host.ok(&[
        "run",
        "--image",
        "base",
        "--no-workspace",
        "--mem",
        "512",
        "--",
        "sh",
        "-c",
        "python3 -c 'print(6*7)'; node -e 'console.log(40+2)'; git --version; npm --version; id -u",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "42", "{out}");
    assert_eq!(lines[1], "42", "{out}");
    assert!(lines[2].starts_with("git version "), "{out}");
    assert!(lines[3].starts_with("12."), "npm: {out}");
    assert_eq!(lines[4], "0", "{out}");
    let node: u32 = host
        .ok(&[
            "run",
            "--image",
            "base",
            "--no-workspace",
            "--",
            "node",
            "-p",
            "process.versions.node.split('.')[0]",
        ])
        .trim()
        .parse()
        .unwrap();
    assert!(node >= 22, "node {node}");

    // As the agent user: its own uid, its groups (sudo among them), and sudo.
    let out = host.ok(&[
        "run",
        "--image",
        "base",
        "--no-workspace",
        "--user",
        "agent",
        "--",
        "sh",
        "-c",
        "id; sudo -n id -u; echo $HOME",
    ]);
    assert!(out.starts_with("uid=1000(agent) gid=1000(agent)"), "{out}");
    assert!(out.contains("(sudo)"), "{out}");
    assert!(out.contains("\n0\n/home/agent\n"), "{out}");
}

#[test]
fn image_sessions_keep_apart_keep_their_disks_and_stay_within_them() {
    let host = Host::new();
    let start = |name: &str| {
        host.ok(&[
            "start",
            "--name",
            name,
            "--image",
            "base",
            "--disk",
            "300M",
            "--no-workspace",
        ])
    };
    start("one");
    start("two");
    host.ok(&[
        "exec",
        "one",
        "--",
        "sh",
        "-c",
        "echo mine > /root/mine && sync",
    ]);
    let out = host.sh("two", "cat /root/mine");
    assert_ne!(
        out.status.code(),
        Some(0),
        "two sees one's file: {}",
        text(&out.stdout)
    );

    // Stopped and started again, the session has its disk back.
    host.ok(&["stop", "one"]);
    host.ok(&["start", "--name", "one"]);
    assert_eq!(
        host.ok(&["exec", "one", "--", "cat", "/root/mine"]),
        "mine\n"
    );
    let ls: serde_json::Value = serde_json::from_str(&host.ok(&["ls", "--json"])).unwrap();
    let one = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "one")
        .unwrap();
    assert_eq!(one["image"], "base");
    assert!(one["disk_bytes"].as_u64().unwrap() > 0);

    // Filling the disk: ENOSPC in the guest, and the host file stays its size.
    let out = host.sh(
        "two",
        "dd if=/dev/zero of=/root/fill bs=1M count=400 2>&1; echo rc=$?",
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("No space left on device") && said.contains("rc=1"),
        "{said}"
    );
    let disk = host.dir.path().join("state/disks/two.ext4");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 300 << 20);
    assert!(
        meta.blocks() * 512 <= 300 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    // The session still works once full, and deleting frees the space.
    assert_eq!(
        text(&host.sh("two", "rm /root/fill && echo ok").stdout),
        "ok\n"
    );

    // `sbx rm` deletes a session's disk.
    host.ok(&["stop", "one"]);
    let one_disk = host.dir.path().join("state/disks/one.ext4");
    assert!(one_disk.exists());
    host.ok(&["rm", "one"]);
    assert!(!one_disk.exists());
    host.ok(&["rm", "--force", "two"]);
    assert!(!disk.exists());
}

/// A package as the npm registry serves it: the tarball and its integrity.
fn npm_package(name: &str, version: &str) -> (Vec<u8>, String) {
    let mut tgz = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        let files = [
            (
                "package/package.json",
                format!(r#"{{"name":"{name}","version":"{version}","main":"index.js"}}"#),
            ),
            (
                "package/index.js",
                "module.exports = 'hello from the test registry';\n".into(),
            ),
        ];
        for (path, body) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, body.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }
    let integrity = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(&tgz))
    );
    (tgz, integrity)
}

const REGISTRY_ADDR: &str = "127.0.0.3";

/// A policy on `preset` that names the test registry's address (loopback
/// addresses always need a rule) and lends npm a token for the registry,
/// which makes the proxy intercept its TLS (and so trust the test CA).
fn npm_policy(preset: &str) -> String {
    format!(
        r#"
version = 1
preset = "{preset}"

[[exec]]
action = "allow"
commands = ["**"]

[[network]]
id = "test-registry-address"
action = "allow"
to = ["{REGISTRY_ADDR}"]
ports = [443]

[[credential]]
id = "npm-token"
action = "allow"
secret = "NPM_TOKEN"
hosts = ["registry.npmjs.org"]
header = "Authorization"
format = "Bearer {{secret}}"
"#
    )
}

#[test]
fn npm_install_goes_through_the_egress_policy() {
    let host = Host::new();
    let dir = host.dir.path();
    let (tgz, integrity) = npm_package("sbx-tiny", "1.0.0");
    let packument = format!(
        r#"{{"name":"sbx-tiny","dist-tags":{{"latest":"1.0.0"}},"versions":{{"1.0.0":{{"name":"sbx-tiny","version":"1.0.0","dist":{{"tarball":"https://registry.npmjs.org/sbx-tiny/-/sbx-tiny-1.0.0.tgz","integrity":"{integrity}"}}}}}}}}"#
    );
    let ca = TestCa::new();
    std::fs::write(dir.join("test-ca.pem"), ca.pem()).unwrap();
    let respond = Arc::new(move |head: &str| {
        let path = head.split_whitespace().nth(1).unwrap_or("");
        match path {
            "/sbx-tiny" => (200, packument.clone().into_bytes()),
            "/sbx-tiny/-/sbx-tiny-1.0.0.tgz" => (200, tgz.clone()),
            _ => (404, b"{}".to_vec()),
        }
    });
    let (_, seen) = https_server_with(
        &format!("{REGISTRY_ADDR}:443"),
        ca.server_config(&["registry.npmjs.org"]),
        respond,
    );
    host.secret("NPM_TOKEN", "npm-test-token");

    let session = |name: &str, preset: &str| {
        let policy = dir.join(format!("{preset}.toml"));
        std::fs::write(&policy, npm_policy(preset)).unwrap();
        let ca = dir.join("test-ca.pem");
        host.ok(&[
            "start",
            "--name",
            name,
            "--image",
            "base",
            "--no-workspace",
            "--mem",
            "512",
            "--policy",
            policy.to_str().unwrap(),
            "--upstream-ca",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("registry.npmjs.org:{REGISTRY_ADDR}"),
        ]);
    };
    let install = "mkdir -p /tmp/p && cd /tmp/p && npm init -y >/dev/null && \
        npm install --no-audit --no-fund --no-update-notifier sbx-tiny 2>&1; echo rc=$?; \
        node -e \"console.log(require('/tmp/p/node_modules/sbx-tiny'))\" 2>&1";

    session("bal", "balanced");
    let out = text(&host.sh("bal", install).stdout);
    assert!(
        out.contains("rc=0") && out.contains("hello from the test registry"),
        "{out}"
    );
    let heads = seen.lock().unwrap().clone();
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with("GET /sbx-tiny/-/sbx-tiny-1.0.0.tgz")),
        "{heads:?}"
    );
    // The token reached the registry; the guest only ever held a placeholder.
    assert!(
        heads.iter().all(|h| h.contains("Bearer npm-test-token")),
        "{heads:?}"
    );
    let env = text(&host.sh("bal", "env").stdout);
    assert!(!env.contains("npm-test-token"), "{env}");

    session("locked", "locked-down");
    let before = seen.lock().unwrap().len();
    let out = text(&host.sh("locked", install).stdout);
    assert!(!out.contains("rc=0"), "{out}");
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "the registry was reached"
    );
    let refused = host.events("locked").into_iter().any(|e| {
        e["decision"] == "deny"
            && e["resource"]
                .as_str()
                .unwrap_or("")
                .contains("registry.npmjs.org")
    });
    assert!(refused, "no refusal of registry.npmjs.org in the audit log");
}

/// `sbx image` with bad input says what is wrong in one line and leaves
/// the store as it was. (No guest needed.)
#[test]
fn bad_image_input_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(sbx_tests::sbx_bin())
            .args(args)
            .env("SBX_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 3000]).unwrap();
    for (args, want) in [
        (
            vec!["image", "import", junk.to_str().unwrap()],
            "not a readable image archive",
        ),
        (
            vec!["image", "import", "/no/such.tar"],
            "cannot open /no/such.tar",
        ),
        (vec!["image", "inspect", "nope"], "no image named nope"),
        (
            vec!["run", "--image", "nope", "--", "true"],
            "no image named nope",
        ),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(125), "{args:?}: {err}");
        // Progress lines, then the error: one line naming the problem.
        let mut lines: Vec<&str> = err.trim_end().lines().collect();
        let last = lines.pop().unwrap_or_default();
        assert!(last.contains(want), "{args:?}: {err}");
        assert!(
            lines.iter().all(|l| l.starts_with("sbx: reading")),
            "{args:?}: {err}"
        );
    }
    let tmp = dir.path().join("cache/images/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

/// A Debian `docker-registry` on the loopback, stopped on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
    storage: std::path::PathBuf,
}

impl Registry {
    fn start(dir: &std::path::Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let storage = dir.join("registry");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect(
                "docker-registry (Debian package docker-registry; `cargo xtask test` installs it)",
            );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
        }
    }

    /// The file the registry keeps blob `hex` in.
    fn blob(&self, hex: &str) -> std::path::PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small image: static busybox as /bin/sh, and an /etc/passwd.
fn busybox_archive(dir: &std::path::Path) -> std::path::PathBuf {
    busybox_image(dir, "bb", b"root:x:0:0:root:/root:/bin/sh\n", &[])
}

/// An image `name` of static busybox as /bin/sh, `passwd` as /etc/passwd,
/// and files of root's under /etc.
fn busybox_image(
    dir: &std::path::Path,
    name: &str,
    passwd: &[u8],
    etc: &[(&str, &[u8])],
) -> std::path::PathBuf {
    let layer = dir.join(format!("{name}-layer.tar"));
    let bb = std::fs::read("/bin/busybox").unwrap();
    let mut l = sbx_image::testing::Layer::new()
        .dir("bin/", 0o755, 0)
        .dir("etc/", 0o755, 0)
        .file("bin/busybox", 0o755, 0, &bb)
        .symlink("bin/sh", "busybox")
        .file("etc/passwd", 0o644, 0, passwd);
    for (file, body) in etc {
        l = l.file(&format!("etc/{file}"), 0o644, 0, body);
    }
    l.write(&layer).unwrap();
    let archive = dir.join(format!("{name}.oci.tar"));
    sbx_image::layout::write_archive(
        &archive,
        name,
        &[&layer],
        sbx_image::manifest::RunConfig::default(),
        &dir.join("scratch"),
    )
    .unwrap();
    archive
}

#[test]
fn images_are_pulled_from_a_real_registry_and_checked() {
    let host = Host::new();
    let dir = host.dir.path();
    let registry = Registry::start(dir);
    let archive = busybox_archive(dir);
    let reference = format!("127.0.0.1:{}/test/bb:1", registry.port);
    // Pushed from an unpacked layout: skopeo unpacks an archive keeping
    // its owners, which only root may.
    let layout = dir.join("bb-layout");
    std::fs::create_dir(&layout).unwrap();
    sbx_tests::run(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    );
    let pushed = std::process::Command::new("skopeo")
        // Its scratch space (/var/tmp by default is read-only in the nested host).
        .arg("--tmpdir")
        .arg(dir)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(pushed.status.success(), "skopeo: {}", text(&pushed.stderr));

    // A store of this test's own (the suite's is read-only here).
    let cache = dir.join("cache");
    let sbx = |args: &[&str]| {
        let mut c = host.cmd(args);
        c.env("SBX_CACHE_DIR", &cache);
        sbx_tests::output_within(&mut c, sbx_tests::SBX_TIMEOUT)
    };
    let out = sbx(&["image", "pull", &reference]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("pulling layer 1/1"),
        "{}",
        text(&out.stderr)
    );
    let out = sbx(&[
        "run",
        "--image",
        &reference,
        "--no-workspace",
        "--",
        "/bin/busybox",
        "echo",
        "pulled",
    ]);
    assert_eq!(text(&out.stdout), "pulled\n", "{}", text(&out.stderr));

    // Pinned by digest: the right one is accepted, another refused.
    let rec: serde_json::Value =
        serde_json::from_slice(&sbx(&["image", "inspect", &reference]).stdout).unwrap();
    let digest = rec["digest"].as_str().unwrap().to_string();
    let pinned = format!("127.0.0.1:{}/test/bb@{digest}", registry.port);
    let out = sbx(&["image", "pull", &pinned, "--name", "pinned"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // An unknown tag and an unreachable registry: one line each.
    for (bad, want) in [
        (
            format!("127.0.0.1:{}/test/bb:nope", registry.port),
            "cannot pull",
        ),
        ("127.0.0.1:1/test/bb:1".to_string(), "cannot pull"),
    ] {
        let out = sbx(&["image", "pull", &bad]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{bad}: {err}");
        let last = err
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(last.contains(want) && last.contains(&bad), "{bad}: {err}");
        assert!(
            err.trim_end().lines().all(|l| l.starts_with("sbx: ")),
            "{bad}: {err}"
        );
    }

    // A layer altered in the registry's storage is refused, naming it.
    let layer = rec["layers"][0].as_str().unwrap().to_string();
    let hex = layer.trim_start_matches("sha256:");
    let blob = registry.blob(hex);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    assert_eq!(
        sbx(&["image", "rm", &reference, "pinned"]).status.code(),
        Some(0)
    );
    let out = sbx(&["image", "pull", &reference]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains(hex), "{err}");
    let tmp = cache.join("images/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0, "left in tmp");
    let ls: serde_json::Value =
        serde_json::from_slice(&sbx(&["image", "ls", "--json"]).stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 0, "{ls}");
}

/// The agent templates `cargo xtask test` built: the agent runs, as the
/// template's user, and its API key is a placeholder in the guest.
#[test]
fn agent_templates_run_their_agents_with_placeholder_keys() {
    let host = Host::new();
    const KEY: &str = "sk-ant-test-key-that-stays-on-the-host";
    host.secret("ANTHROPIC_API_KEY", KEY);

    let out = host.ok(&[
        "run",
        "--template",
        "claude-code",
        "--no-workspace",
        "--mem",
        "1024",
        "--",
        "sh",
        "-c",
        "id -un; claude --version; echo KEY=$ANTHROPIC_API_KEY",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"agent"), "{out}");
    assert!(
        lines.iter().any(|l| l.contains("2.1.332")),
        "claude --version: {out}"
    );
    let key = lines.iter().find(|l| l.starts_with("KEY=")).unwrap();
    assert!(
        key.starts_with("KEY=sbx-secret-ANTHROPIC_API_KEY-"),
        "{out}"
    );
    assert!(!out.contains(KEY), "{out}");

    let out = host.ok(&[
        "run",
        "--template",
        "codex",
        "--no-workspace",
        "--mem",
        "1024",
        "--",
        "codex",
        "--version",
    ]);
    assert!(out.contains("0.171.0"), "codex --version: {out}");
}

/// A template built here: its steps' changes (a file added, one of the
/// base's deleted) are saved as a layer stacked over the base, and a
/// session from it sees them, as the template's user.
#[test]
fn a_built_template_stacks_its_changes_over_the_base() {
    let host = Host::new();
    let dir = host.dir.path();
    let archive = busybox_image(
        dir,
        "small",
        b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000::/tmp:/bin/sh\n",
        &[("gone", b"deleted by the build\n")],
    );
    let template = dir.join("stacked.toml");
    std::fs::write(
        &template,
        r#"name = "stacked"
image = "small"
user = "agent"
[env]
GREETING = "from the template"
[build]
steps = ["busybox mkdir -p /opt && busybox echo built > /opt/built && busybox rm /etc/gone"]
"#,
    )
    .unwrap();
    // A store of this test's own (the suite's is read-only here).
    let cache = dir.join("cache");
    let sbx = |args: &[&str]| {
        let mut c = host.cmd(args);
        c.env("SBX_CACHE_DIR", &cache);
        sbx_tests::output_within(&mut c, sbx_tests::SBX_TIMEOUT)
    };
    let ok = |args: &[&str]| {
        let out = sbx(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "sbx {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    ok(&["image", "import", archive.to_str().unwrap()]);
    let t = template.to_str().unwrap();
    let out = sbx(&["template", "build", t]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("saving what the steps changed"), "{err}");

    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["image", "inspect", "template/stacked"])).unwrap();
    let roots = inspect["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 2, "{inspect}");
    let base: serde_json::Value =
        serde_json::from_str(&ok(&["image", "inspect", "small"])).unwrap();
    assert_eq!(roots[1], base["roots"][0], "the base's root is shared");

    let out = ok(&[
        "run",
        "--template",
        t,
        "--no-workspace",
        "--",
        "sh",
        "-c",
        "busybox id -u; busybox cat /opt/built; busybox test -e /etc/gone || echo gone; echo $GREETING",
    ]);
    assert_eq!(out, "1000\nbuilt\ngone\nfrom the template\n");
    // Built once: a second build finds it.
    let again = sbx(&["template", "build", t]);
    assert!(
        !text(&again.stderr).contains("step 1/1"),
        "{}",
        text(&again.stderr)
    );
    // The base's name can go; the template's image keeps its root.
    ok(&["image", "rm", "small"]);
    let out = ok(&[
        "run",
        "--image",
        "template/stacked",
        "--no-workspace",
        "--",
        "busybox",
        "cat",
        "/opt/built",
    ]);
    assert_eq!(out, "built\n");
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    sbx_tests::run(
        std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@sbx.test"])
            .args(args)
            .current_dir(dir),
    )
}

/// `--workspace clone`: the repository is cloned onto the session's disk;
/// the host's files stay as they were; `sbx fetch` brings commits back.
#[test]
fn a_clone_workspace_keeps_to_itself_and_its_commits_come_back() {
    let host = Host::new();
    let repo = host.dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("a.txt"), "one\n").unwrap();
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-qm", "one"]);

    host.ok_in(
        &repo,
        &[
            "start",
            "--name",
            "c",
            "--image",
            "base",
            "--workspace",
            "clone",
        ],
    );
    assert_eq!(host.ok(&["exec", "c", "--", "cat", "a.txt"]), "one\n");
    let out = host.sh(
        "c",
        "echo two >> a.txt && git -c user.name=a -c user.email=a@sbx.test commit -qam two && echo done",
    );
    assert_eq!(text(&out.stdout), "done\n", "{}", text(&out.stderr));
    // The host's working tree is untouched (the share is read-only anyway).
    assert_eq!(
        std::fs::read_to_string(repo.join("a.txt")).unwrap(),
        "one\n"
    );

    let fetched = host.ok_in(&repo, &["fetch", "c"]);
    assert_eq!(fetched.trim(), "sbx/c/main", "{fetched}");
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%s", "sbx/c/main"]),
        "two\n"
    );

    // Stopped and started again: the same clone, not a fresh one.
    host.ok(&["stop", "c"]);
    host.ok_in(&repo, &["start", "--name", "c"]);
    assert_eq!(
        host.ok(&["exec", "c", "--", "git", "log", "-1", "--format=%s"]),
        "two\n"
    );
}

/// A user who is not root converts an image whose files belong to other
/// users, devices and setuid programs, and the file system image says so.
/// (No guest needed. As root, the test drops to `nobody`; the suite
/// otherwise runs as an ordinary user already.)
#[test]
fn a_normal_user_converts_images_with_their_owners_intact() {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer.tar");
    sbx_image::testing::Layer::new()
        .dir("home/agent/", 0o700, 1000)
        .file("home/agent/notes", 0o600, 1000, b"mine")
        .file("usr/bin/su", 0o4755, 0, b"elf")
        .char_dev("dev/null", 0o666, 1, 3)
        .write(&layer)
        .unwrap();
    let archive = dir.path().join("owners.oci.tar");
    sbx_image::layout::write_archive(
        &archive,
        "owners",
        &[&layer],
        sbx_image::manifest::RunConfig::default(),
        &dir.path().join("scratch"),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let (mut cmd, user) = if me == 0 {
        for p in [dir.path(), &cache, &archive] {
            sbx_tests::run(std::process::Command::new("chmod").arg("a+rwx").arg(p));
        }
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(sbx_tests::sbx_bin());
        (c, 65534)
    } else {
        (std::process::Command::new(sbx_tests::sbx_bin()), me)
    };
    let out = cmd
        .args(["image", "import"])
        .arg(&archive)
        .env("SBX_CACHE_DIR", &cache)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "as uid {user}: {}", text(&out.stderr));
    let roots = cache.join("images/roots");
    let root = std::fs::read_dir(&roots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // Made by that user, owned inside as the layer says.
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&root).unwrap()),
        user
    );
    let stat = |p: &str| sbx_image::testing::debugfs(&root, &format!("stat {p}"));
    let notes = stat("/home/agent/notes");
    assert!(
        notes.contains("User:  1000") && notes.contains("Mode:  0600"),
        "{notes}"
    );
    let su = stat("/usr/bin/su");
    assert!(
        su.contains("User:     0") && su.contains("Mode:  04755"),
        "{su}"
    );
    assert!(stat("/dev/null").contains("Type: character special"));
}
