//! For tests only (feature `testing`): a PostgreSQL server of this test
//! process's own, from the system's packages (Debian's `postgresql`), and
//! databases in it, so the suite runs against PostgreSQL as well as SQLite
//! with nothing else to set up.
//!
//! The server lives in `$TMPDIR/sbx-test-pg-<pid>` and stops when the test
//! process ends (the kernel signals it); a later run removes directories
//! whose process is gone. It also speaks TLS, with a certificate for
//! 127.0.0.1 from a CA of its own ([`postgres_ca`]), for clients that ask.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Cluster {
    port: u16,
    ca: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("cannot start PostgreSQL for the tests: {e}"),
    }
}

/// The CA that signed the tests' PostgreSQL's certificate (PEM).
pub fn postgres_ca() -> PathBuf {
    cluster().ca.clone()
}

/// The address of database `name` (made on first use) in this process's
/// PostgreSQL server (started on first use). Panics with what went wrong
/// when PostgreSQL cannot start: the test cannot run.
pub fn postgres_database(name: &str) -> String {
    let cluster = cluster();
    let db: String = format!(
        "sbx_{}",
        name.bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '_'
            })
            .collect::<String>()
            .to_ascii_lowercase()
    );
    let db = &db[..db.len().min(60)];
    let admin = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port
    );
    let mut c = postgres::Client::connect(&admin, postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot reach the tests' PostgreSQL: {e}"));
    let exists = c
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .unwrap()
        .is_some();
    if !exists {
        c.batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .unwrap_or_else(|e| panic!("cannot create database {db}: {e}"));
    }
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={db}",
        cluster.port
    )
}

/// Where Debian keeps the newest PostgreSQL's programs.
fn programs() -> Result<PathBuf, String> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql: {e}: install Debian's `postgresql` package"))?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no initdb under /usr/lib/postgresql: install `postgresql`".into())
}

/// PostgreSQL refuses to run as root: as root, it runs as `postgres`.
fn owner() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            "running as root, and there is no `postgres` user to run PostgreSQL as".into()
        })
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        // std drops root's supplementary groups with the uid.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Removes the directories of earlier test processes that are gone.
fn clean_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sbx-test-pg-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A CA (`ca.crt`) and a certificate for 127.0.0.1 signed by it
/// (`server.crt`, `server.key`), written in `dir`, for a test's own TLS
/// server. Returns the CA.
pub fn localhost_certificates(dir: &Path) -> Result<PathBuf, String> {
    certificates(dir, None)
}

/// A CA and the server's certificate for 127.0.0.1, signed by it; the key
/// readable by the server only, as PostgreSQL insists. Returns the CA.
fn certificates(dir: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf, String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .map_err(e)?
        .signed_by(&key, &ca, &ca_key)
        .map_err(e)?;
    let write = |name: &str, text: String, mode: u32| -> Result<PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        Ok(p)
    };
    write("server.crt", cert.pem(), 0o644)?;
    write("server.key", key.serialize_pem(), 0o600)?;
    write("ca.crt", ca.pem(), 0o644)
}

fn start() -> Result<Cluster, String> {
    let bin = programs()?;
    let owner = owner()?;
    let tmp = std::env::temp_dir();
    clean_stale(&tmp);
    let dir = tmp.join(format!("sbx-test-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let out = as_owner(&mut Command::new(bin.join("initdb")), owner)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let ca = certificates(&dir, owner)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let log = std::fs::File::create(dir.join("postgres.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin.join("postgres"));
    as_owner(&mut cmd, owner)
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(&dir)
        // A test database need not survive a crash.
        .args([
            "-F",
            "-c",
            "max_connections=300",
            "-c",
            "full_page_writes=off",
        ])
        .args(["-c", "ssl=on", "-c"])
        .arg(format!(
            "ssl_cert_file={}",
            dir.join("server.crt").display()
        ))
        .arg("-c")
        .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                // Immediate shutdown when the thread that started it ends:
                // that thread lives as long as the test process.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let child = cmd.spawn();
            let _ = tx.send(child.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("postgres: {e}"))?;
    let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match postgres::Client::connect(&admin, postgres::NoTls) {
            Ok(_) => return Ok(Cluster { port, ca }),
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                return Err(format!(
                    "postgres did not answer on port {port}: {e}\n{log}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Serves `state` on `listener` (non-blocking) from a thread and a runtime
/// of its own, until the sender is used or dropped; the thread ends then.
pub fn serve_in_thread(
    state: crate::AppState,
    listener: std::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the server");
        rt.block_on(async {
            let listener =
                tokio::net::TcpListener::from_std(listener).expect("a non-blocking listener");
            let _ = crate::serve_until(state, listener, async {
                let _ = rx.await;
            })
            .await;
        });
    });
    (tx, thread)
}
