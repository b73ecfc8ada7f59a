//! Shared directories: what `--mount` and the workspace ask for, checked by
//! the policy, turned into virtio-fs devices, and audited (refusals one by
//! one, changes coalesced).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use sbx_audit::{AuditLog, Category, Event};
use sbx_policy::{Access, Policy, Surface, Verdict};
use vmm::devices::virtio::fs::{
    Change, FsAccess, FsCache, FsConfig, FsPolicy, HostChanges, Refusal,
};

/// Where the current directory appears in the guest.
pub const WORKSPACE: &str = "/workspace";

/// How often coalesced file changes are written to the audit log.
const CHANGE_WINDOW: Duration = Duration::from_secs(5);
/// Paths named per kind of change in one record; the rest are counted.
const SAMPLE_PATHS: usize = 20;
/// Distinct paths remembered per window, so a huge build cannot grow it without bound.
const MAX_TRACKED: usize = 10_000;

/// One `HOST:GUEST[:ro|rw]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl MountSpec {
    /// Parses a `--mount` value; the host directory must exist. Read-only
    /// unless `:rw` is given, as in policy files.
    pub fn parse(spec: &str) -> anyhow::Result<MountSpec> {
        let usage = || {
            format!("--mount `{spec}`: expected HOST:GUEST[:ro|rw], for example --mount ~/src/lib:/lib:ro")
        };
        let (rest, read_only) = match spec.rsplit_once(':') {
            Some((r, "ro")) => (r, true),
            Some((r, "rw")) => (r, false),
            _ => (spec, true),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            bail!(usage());
        };
        if host.is_empty() || !guest.starts_with('/') {
            bail!("{}; the guest path must be absolute", usage());
        }
        check_guest_path(guest).with_context(|| format!("--mount `{spec}`"))?;
        let host = expand_home(host);
        let canonical = std::fs::canonicalize(&host)
            .with_context(|| format!("--mount `{spec}`: cannot use {}", host.display()))?;
        if !canonical.is_dir() {
            bail!(
                "--mount `{spec}`: {} is not a directory (only directories are shared)",
                canonical.display()
            );
        }
        Ok(MountSpec {
            host: canonical,
            guest: guest.to_string(),
            read_only,
        })
    }

    /// The workspace: `dir` read-write at /workspace. `/` and the home
    /// directory are refused: sharing them whole is never what was meant.
    pub fn workspace(dir: &Path) -> anyhow::Result<MountSpec> {
        let host = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot share the current directory {}", dir.display()))?;
        let home = std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok());
        if host == Path::new("/") || Some(&host) == home.as_ref() {
            bail!(
                "the current directory {} would be shared read-write at {WORKSPACE}; run sbx from a project directory, or pass --no-workspace",
                host.display()
            );
        }
        Ok(MountSpec {
            host,
            guest: WORKSPACE.into(),
            read_only: false,
        })
    }

    /// The same spec, for the session process's command line.
    pub fn to_arg(&self) -> String {
        format!(
            "{}:{}:{}",
            self.host.display(),
            self.guest,
            if self.read_only { "ro" } else { "rw" }
        )
    }
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// Guest paths travel on the kernel command line (`sbx.fs=TAG,PATH,MODE`).
fn check_guest_path(guest: &str) -> anyhow::Result<()> {
    if let Some(c) = guest
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, ',' | '"' | '\0'))
    {
        bail!(
            "the guest path {guest:?} contains {c:?}; use letters, digits, '/', '-', '_' and '.'"
        );
    }
    Ok(())
}

/// Grants the session's mounts in `policy`; a refusal is audited and ends
/// the start, naming the rule.
pub fn grant(policy: &mut Policy, specs: &[MountSpec], log: &AuditLog) -> anyhow::Result<()> {
    for m in specs {
        if let Err(refusal) = policy.grant_mount(&m.host, &m.guest, m.read_only) {
            log.append(
                Category::Decision,
                Event {
                    surface: Some(Surface::Fs.as_str().into()),
                    action: "mount".into(),
                    resource: m.to_arg(),
                    decision: Some("deny".into()),
                    rule_id: refusal.rule.as_ref().map(|r| r.id.clone()),
                    layer: refusal.rule.as_ref().map(|r| r.layer.as_str().into()),
                    rule_source: refusal.rule.as_ref().map(|r| r.location.to_string()),
                    reason: Some(refusal.reason.clone()),
                    mode: Some("enforce".into()),
                    ..Event::default()
                },
            )?;
            bail!("{refusal}");
        }
    }
    Ok(())
}

/// Every mount the policy holds, as a device, and the kernel command-line
/// words that have the guest agent mount them.
pub fn devices(
    policy: &Policy,
    log: &AuditLog,
    cache: FsCache,
    fs_policy: Arc<dyn FsPolicy>,
) -> anyhow::Result<(Vec<FsConfig>, Vec<String>)> {
    let mut configs = Vec::new();
    let mut words = Vec::new();
    for (i, m) in policy.mounts().iter().enumerate() {
        check_guest_path(m.guest)
            .with_context(|| format!("mount {} ({})", m.rule.id, m.rule.location))?;
        if !m.host.is_dir() {
            bail!(
                "mount `{}` ({}) shares {}, which is not a directory on this host; create it or change the rule",
                m.rule.id,
                m.rule.location,
                m.host.display()
            );
        }
        let tag = format!("sbx{i}");
        let mode = if m.read_only { "ro" } else { "rw" };
        words.push(format!("sbx.fs={tag},{},{mode}", m.guest));
        log.append(
            Category::Session,
            Event {
                surface: Some(Surface::Fs.as_str().into()),
                action: "mount".into(),
                resource: format!("{}:{}:{mode}", m.host.display(), m.guest),
                rule_id: Some(m.rule.id.clone()),
                layer: Some(m.rule.layer.as_str().into()),
                rule_source: Some(m.rule.location.to_string()),
                details: serde_json::json!({ "tag": tag, "cache": cache.as_str() }),
                ..Event::default()
            },
        )?;
        configs.push(FsConfig {
            tag,
            host_dir: m.host.to_path_buf(),
            guest_path: m.guest.to_string(),
            read_only: m.read_only,
            mount_rule: m.rule.id.clone(),
            cache,
            policy: fs_policy.clone(),
        });
    }
    Ok((configs, words))
}

/// The policy and audit log as the virtio-fs devices see them, and where
/// host edits go (to the guest agent, see `host_edits`).
pub struct FileAudit {
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    changes: Arc<Changes>,
    host_edits: Sender<HostChanges>,
}

impl FileAudit {
    /// Starts the thread that writes coalesced changes every few seconds.
    pub fn new(
        policy: Arc<Policy>,
        log: Arc<AuditLog>,
        host_edits: Sender<HostChanges>,
    ) -> std::io::Result<Arc<FileAudit>> {
        let changes = Arc::new(Changes::default());
        let (c, l) = (changes.clone(), log.clone());
        std::thread::Builder::new()
            .name("file-events".into())
            .spawn(move || c.run(&l))?;
        Ok(Arc::new(FileAudit {
            policy,
            log,
            changes,
            host_edits,
        }))
    }

    /// Writes what is pending (at session end).
    pub fn flush(&self) {
        self.changes.flush(&self.log);
    }
}

impl FsPolicy for FileAudit {
    fn check(&self, path: &str, access: FsAccess) -> Option<Refusal> {
        let access = match access {
            FsAccess::Read => Access::Read,
            FsAccess::Write => Access::Write,
        };
        let d = self.policy.decide_fs(path, access);
        if d.allowed() {
            if d.verdict == Verdict::Deny {
                // An audit-mode rule: recorded, not enforced.
                let _ = self.log.decision(Surface::Fs, access.as_str(), path, &d);
            }
            return None;
        }
        Some(Refusal {
            rule: d.rule.id.clone(),
            reason: d.reason.to_string(),
        })
    }

    fn denied(&self, op: &str, path: &str, refusal: &Refusal) {
        let rule = self.policy.rules().iter().find(|r| r.id == refusal.rule);
        let event = Event {
            surface: Some(Surface::Fs.as_str().into()),
            action: op.into(),
            resource: path.into(),
            decision: Some("deny".into()),
            rule_id: Some(refusal.rule.clone()),
            layer: Some(rule.map_or("builtin", |r| r.layer.as_str()).into()),
            rule_source: rule.map(|r| r.location.to_string()),
            reason: Some(refusal.reason.clone()),
            mode: Some("enforce".into()),
            details: serde_json::Value::Null,
        };
        if let Err(e) = self.log.append(Category::Decision, event) {
            tracing::error!("{e}");
        }
    }

    fn changed(&self, change: Change, path: &str) {
        self.changes.add(change, path);
    }

    fn host_changed(&self, changes: &HostChanges) {
        let _ = self.host_edits.send(changes.clone());
    }
}

/// Changes seen since the last record: distinct paths per kind, and counts.
#[derive(Default)]
struct Window {
    paths: BTreeMap<Change, BTreeSet<String>>,
    counts: BTreeMap<Change, u64>,
}

#[derive(Default)]
struct Changes {
    window: Mutex<Window>,
}

impl Changes {
    fn add(&self, change: Change, path: &str) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let set = w.paths.entry(change).or_default();
        let fresh = set.len() < MAX_TRACKED && set.insert(path.to_string());
        // Past the cap, every event counts; below it, each path once.
        if fresh || set.len() >= MAX_TRACKED {
            *w.counts.entry(change).or_default() += 1;
        }
    }

    fn run(&self, log: &AuditLog) {
        loop {
            std::thread::sleep(CHANGE_WINDOW);
            self.flush(log);
        }
    }

    /// One `file_changes` record for everything since the last one.
    fn flush(&self, log: &AuditLog) {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|e| e.into_inner()));
        if w.counts.is_empty() {
            return;
        }
        let mut details = serde_json::Map::new();
        let mut summary = Vec::new();
        for (change, n) in &w.counts {
            let sample: Vec<&String> = w.paths[change].iter().take(SAMPLE_PATHS).collect();
            summary.push(format!("{n} {}", change.as_str()));
            details.insert(
                change.as_str().into(),
                serde_json::json!({ "count": n, "paths": sample }),
            );
        }
        let event = Event {
            surface: Some(Surface::Fs.as_str().into()),
            action: "file_changes".into(),
            resource: summary.join(", "),
            details: serde_json::Value::Object(details),
            ..Event::default()
        };
        if let Err(e) = log.append(Category::Guest, event) {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_specs() {
        let tmp = std::env::temp_dir();
        let t = tmp.to_str().unwrap();
        let m = MountSpec::parse(&format!("{t}:/data")).unwrap();
        assert!(m.read_only);
        assert_eq!(m.guest, "/data");
        let m = MountSpec::parse(&format!("{t}:/data:rw")).unwrap();
        assert!(!m.read_only);
        assert_eq!(MountSpec::parse(&m.to_arg()).unwrap(), m);
        for bad in [
            "nocolon",
            "/tmp:relative",
            ":/x",
            "/tmp:/with space",
            "/no/such/dir:/x",
        ] {
            assert!(MountSpec::parse(bad).is_err(), "{bad}");
        }
        let e = MountSpec::parse("/etc/hostname:/x").unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
    }

    #[test]
    fn changes_coalesce_per_path() {
        let c = Changes::default();
        for _ in 0..1000 {
            c.add(Change::Written, "/workspace/a");
        }
        c.add(Change::Created, "/workspace/b");
        let w = c.window.lock().unwrap();
        assert_eq!(w.counts[&Change::Written], 1);
        assert_eq!(w.counts[&Change::Created], 1);
    }
}
