//! This machine's link to a control plane (`sbx-server`): signing in with
//! a device code (`sbx login URL`), and refreshing the org and team policy
//! bundles it serves at every session start.
//!
//! The bundles are kept where policy discovery finds them
//! (`<config>/managed/`, see `sbx_policy::Locations::managed`), named with
//! their server versions, beside the organisation's key pinned at sign-in.
//! A bundle is checked against that key before it is kept, and again each
//! time it is loaded, so one edited on disk is refused. Offline, the last
//! bundles serve until their signed expiry; then the policy refuses to load
//! and sessions do not start (fail closed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{fail, At, Error, Result};
use crate::paths;

/// The sign-in, as kept in `<config>/server.json` (0600: it holds the token).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Login {
    pub url: String,
    pub token: String,
    pub email: String,
    pub team: Option<String>,
    pub role: String,
    pub machine: String,
    /// The organisation's public key, pinned at sign-in.
    pub org_key: String,
}

/// What a refresh did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Not signed in: no managed policy.
    NotManaged,
    /// The kept bundles are current.
    Unchanged,
    /// New bundles were kept: their names.
    Updated(Vec<String>),
    /// The server could not be reached: the kept bundles serve until they
    /// expire. Why, for a warning.
    Offline(String),
}

fn login_path() -> PathBuf {
    paths::config_dir().join("server.json")
}

fn managed_dir() -> PathBuf {
    sbx_policy::Locations::here().managed()
}

/// The sign-in, if this machine has one. A file this user cannot read
/// counts as none, as policy discovery treats every layer's file.
pub fn current() -> Result<Option<Login>> {
    match std::fs::read(login_path()) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::Invalid(format!(
                "{} is not a sign-in ({e}): run `sbx logout`, then `sbx login URL`",
                login_path().display()
            ))
        }),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).at(|| format!("cannot read {}", login_path().display())),
    }
}

/// An HTTP client for `url`: the host's roots are read only for HTTPS
/// (reading them costs more than a fetch on the loopback).
fn client(url: &str, timeout: Duration) -> Result<reqwest::blocking::Client> {
    let tls = if url.starts_with("https://") {
        // What the egress proxy trusts upstream.
        (*sbx_egress::mitm::upstream_config(&[]).map_err(|e| Error::Session(e.to_string()))?)
            .clone()
    } else {
        // Plain HTTP never uses it; reqwest still wants one.
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Session(e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    };
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Session(format!("cannot make an HTTP client: {e}")))
}

fn api(url: &str, path: &str) -> String {
    format!("{}/api/v1/{path}", url.trim_end_matches('/'))
}

/// The server's words for an error answer.
fn said(r: reqwest::blocking::Response) -> String {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    match body["error"].as_str() {
        Some(e) => format!("{e} ({status})"),
        None => status.to_string(),
    }
}

/// [`crate::secrets::write_private`], making the directory first.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(|| format!("cannot create {}", dir.display()))?;
    }
    crate::secrets::write_private(path, bytes)
}

/// Signs this machine in to the server at `url` as `machine`: `show` is
/// told the code and where to approve it; this returns once a person has.
pub fn login(url: &str, machine: &str, show: impl FnOnce(&str, &str)) -> Result<Login> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        fail!(
            Invalid,
            "`{url}` is not a server address: write https://HOST[:PORT]"
        );
    }
    let c = client(url, Duration::from_secs(15))?;
    let unreachable = |e: reqwest::Error| Error::Session(format!("cannot reach {url}: {e}"));
    let r = c
        .post(api(url, "device/code"))
        .json(&json!({ "machine": machine }))
        .send()
        .map_err(unreachable)?;
    if !r.status().is_success() {
        fail!(Session, "{url} refused to start a sign-in: {}", said(r));
    }
    let code: Value = r.json().map_err(unreachable)?;
    let device = code["device_code"].as_str().unwrap_or_default().to_string();
    show(
        code["user_code"].as_str().unwrap_or_default(),
        code["verification_uri"].as_str().unwrap_or_default(),
    );
    let interval = Duration::from_secs(code["interval"].as_u64().unwrap_or(2).max(1));
    let deadline =
        std::time::Instant::now() + Duration::from_secs(code["expires_in"].as_u64().unwrap_or(600));
    let got: Value = loop {
        std::thread::sleep(interval);
        if std::time::Instant::now() > deadline {
            fail!(
                Session,
                "nobody approved the code in time: run `sbx login {url}` again"
            );
        }
        let r = c
            .post(api(url, "device/token"))
            .json(&json!({ "device_code": device }))
            .send()
            .map_err(unreachable)?;
        if r.status().is_success() {
            break r.json().map_err(unreachable)?;
        }
        let status = r.status();
        let body: Value = r.json().unwrap_or(Value::Null);
        match (status.as_u16(), body["error"].as_str()) {
            (400, Some("authorization_pending")) | (429, _) => continue,
            (_, e) => fail!(
                Session,
                "{url} refused the sign-in: {}",
                e.unwrap_or(status.as_str())
            ),
        }
    };
    let s = |k: &str| got[k].as_str().unwrap_or_default().to_string();
    let login = Login {
        url: url.trim_end_matches('/').to_string(),
        token: s("token"),
        email: s("email"),
        team: got["team"].as_str().map(str::to_string),
        role: s("role"),
        machine: s("machine"),
        org_key: s("org_key"),
    };
    sbx_policy::decode_public_key(&login.org_key).map_err(|e| {
        Error::Session(format!(
            "{url} sent an organisation key that is not one: {e}"
        ))
    })?;
    // A new sign-in starts from nothing: no bundle of another organisation stays.
    let _ = std::fs::remove_dir_all(managed_dir());
    write_private(
        &login_path(),
        &serde_json::to_vec_pretty(&login).unwrap_or_default(),
    )?;
    write_private(
        &managed_dir().join("org.pub"),
        format!("{}\n", login.org_key).as_bytes(),
    )?;
    Ok(login)
}

/// Signs out: revokes this machine's token on the server (when it can be
/// reached) and forgets the sign-in and its bundles. Returns whether there
/// was one, and whether the server confirmed the revocation.
pub fn logout() -> Result<Option<bool>> {
    let Some(login) = current()? else {
        return Ok(None);
    };
    let revoked = (|| {
        let c = client(&login.url, Duration::from_secs(10)).ok()?;
        let mine: Value = c
            .get(api(&login.url, "tokens"))
            .bearer_auth(&login.token)
            .send()
            .ok()?
            .json()
            .ok()?;
        let id = mine.as_array()?.iter().find(|t| t["current"] == true)?["id"].as_i64()?;
        let r = c
            .delete(api(&login.url, &format!("tokens/{id}")))
            .bearer_auth(&login.token)
            .send()
            .ok()?;
        Some(r.status().is_success())
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_dir_all(managed_dir());
    std::fs::remove_file(login_path())
        .at(|| format!("cannot remove {}", login_path().display()))?;
    Ok(Some(revoked))
}

/// Fetches the org and team bundles if they changed (a conditional
/// request), checks them against the pinned key, and keeps them.
pub fn refresh() -> Result<Refresh> {
    let Some(login) = current()? else {
        return Ok(Refresh::NotManaged);
    };
    let dir = managed_dir();
    let etag_path = dir.join("etag");
    let etag = std::fs::read_to_string(&etag_path).unwrap_or_default();
    let c = client(&login.url, Duration::from_secs(10))?;
    let mut req = c.get(api(&login.url, "policy")).bearer_auth(&login.token);
    if !etag.is_empty() && dir.join("org.pub").exists() {
        req = req.header("If-None-Match", etag.trim());
    }
    let r = match req.send() {
        Ok(r) => r,
        Err(e) => return Ok(Refresh::Offline(format!("cannot reach {}: {e}", login.url))),
    };
    match r.status().as_u16() {
        304 => return Ok(Refresh::Unchanged),
        200 => {}
        _ => {
            return Ok(Refresh::Offline(format!(
                "{} refused: {}",
                login.url,
                said(r)
            )))
        }
    }
    let new_etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = r
        .json()
        .map_err(|e| Error::Session(format!("{} sent an unreadable policy: {e}", login.url)))?;
    let pinned = sbx_policy::decode_public_key(&login.org_key).map_err(|e| {
        Error::Invalid(format!(
            "the pinned organisation key is damaged ({e}): run `sbx login` again"
        ))
    })?;
    let mut wanted: Vec<(String, String)> = Vec::new();
    if let Some(v) = body["org"]["version"].as_i64() {
        wanted.push((
            format!("org-v{v}.bundle"),
            body["org"]["bundle"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    if let (Some(v), Some(team)) = (body["team"]["version"].as_i64(), body["team_name"].as_str()) {
        wanted.push((
            format!("team-{team}-v{v}.bundle"),
            body["team"]["bundle"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    for (name, text) in &wanted {
        sbx_policy::bundle_open(text, &[pinned]).map_err(|why| {
            Error::Policy(sbx_policy::PolicyError::Bundle {
                file: format!("{} ({name})", login.url),
                reason: why,
            })
        })?;
    }
    // Keep the new ones, then drop the old: never a moment with neither.
    let mut names = Vec::new();
    for (name, text) in &wanted {
        write_private(&dir.join(name), text.as_bytes())?;
        names.push(name.clone());
    }
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".bundle") && !names.contains(&n) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    write_private(&etag_path, new_etag.as_bytes())?;
    Ok(Refresh::Updated(names))
}

/// How many records one request ships at most.
const SHIP_BATCH: usize = 500;

/// What shipping one session's log did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shipped {
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub flagged: u64,
}

/// Where shipping `log` stands locally: the byte offset after the last
/// line the server acknowledged, and that line's sequence number.
fn cursor_path(log: &Path) -> PathBuf {
    log.with_extension("shipped")
}

/// Ships the records of the session log at `log` that the server does not
/// hold yet; `all` ships every record again (the server drops what it has
/// and flags what differs). The local log is the spool: nothing is lost
/// while the server is away, and nothing is counted twice.
pub fn ship(log: &Path, all: bool) -> Result<Shipped> {
    let Some(login) = current()? else {
        fail!(
            Invalid,
            "not signed in to an sbx server: `sbx login URL` first"
        );
    };
    let session = log
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let text = std::fs::read_to_string(log).at(|| format!("cannot read {}", log.display()))?;
    // The local cursor saves reading what was shipped; the server's head
    // decides what is sent.
    let start = if all {
        0
    } else {
        std::fs::read_to_string(cursor_path(log))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<usize>().ok())
            .filter(|&o| o <= text.len() && (o == 0 || text.as_bytes()[o - 1] == b'\n'))
            .unwrap_or(0)
    };
    if start == text.len() {
        // Everything was acknowledged: no request at all.
        return Ok(Shipped::default());
    }
    let c = client(&login.url, Duration::from_secs(30))?;
    let unreachable =
        |e: reqwest::Error| Error::Session(format!("cannot reach {}: {e}", login.url));
    let heads: Value = c
        .get(api(&login.url, "audit/heads"))
        .bearer_auth(&login.token)
        .send()
        .map_err(unreachable)?
        .json()
        .map_err(unreachable)?;
    let held = heads[&session].as_u64().unwrap_or(0);
    let mut pending: Vec<&str> = Vec::new();
    let mut offset = start;
    let mut done = Shipped::default();
    let mut send = |lines: &[&str], end: usize| -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let body = lines.join("\n") + "\n";
        let r = c
            .post(api(&login.url, "audit"))
            .bearer_auth(&login.token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .map_err(unreachable)?;
        if !r.status().is_success() {
            fail!(
                Session,
                "{} refused the records of {}: {}",
                login.url,
                log.display(),
                said(r)
            );
        }
        let v: Value = r.json().map_err(unreachable)?;
        done.sent += lines.len() as u64;
        done.accepted += v["accepted"].as_u64().unwrap_or(0);
        done.duplicates += v["duplicates"].as_u64().unwrap_or(0);
        done.flagged += v["flagged"].as_u64().unwrap_or(0);
        write_private(&cursor_path(log), format!("{end}\n").as_bytes())
    };
    for line in text[start..].split_inclusive('\n') {
        if !line.ends_with('\n') {
            // Still being written: shipped next time.
            break;
        }
        offset += line.len();
        let l = line.trim_end();
        if l.is_empty() {
            continue;
        }
        let seq = serde_json::from_str::<Value>(l)
            .ok()
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(0);
        if !all && seq <= held {
            continue;
        }
        pending.push(l);
        if pending.len() == SHIP_BATCH {
            send(&pending, offset)?;
            pending.clear();
        }
    }
    send(&pending, offset)?;
    Ok(done)
}
