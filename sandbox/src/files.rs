//! Shared directories: the spec's mounts granted by the policy, turned
//! into virtio-fs devices, and the session's side of each device (the
//! [`FileSupervisor`]): the policy's decisions, refusals audited one by
//! one, changes coalesced, host edits passed on to the guest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sbx_audit::{AuditLog, Entry, RuleCite};
use sbx_policy::{Access, Policy, Surface, Verdict};
use sbx_protocol::cmdline::{check_guest_path, Share};
use vmm::devices::virtio::fs::{
    Change, FsAccess, FsCache, FsConfig, FsSupervisor, HostChanges, Refusal, RuleRef, ShareQuota,
    WatchBudget,
};

use crate::error::{fail, At, Result};
use crate::spec::MountSpec;
use crate::throttle::Limits;

/// How often coalesced file changes are written to the audit log.
const CHANGE_WINDOW: Duration = Duration::from_secs(5);
/// Paths named per kind of change in one record; the rest are counted.
const SAMPLE_PATHS: usize = 20;
/// Distinct paths remembered per window, so a huge build cannot grow it without bound.
const MAX_TRACKED: usize = 10_000;

/// Grants the session's mounts in `policy`; a refusal is audited and ends
/// the start, naming the rule.
pub fn grant(policy: &mut Policy, mounts: &[MountSpec], log: &AuditLog) -> Result<()> {
    for m in mounts {
        if let Err(refusal) = policy.grant_mount(&m.host, &m.guest, m.read_only) {
            log.record(Entry::mount_refused(&m.to_string(), &refusal))?;
            fail!(Denied, "{refusal}");
        }
    }
    Ok(())
}

fn rule_ref(rule: &sbx_policy::RuleInfo) -> RuleRef {
    RuleRef {
        id: rule.id.clone(),
        layer: rule.layer.as_str().into(),
        location: Some(rule.location.to_string()),
    }
}

/// Every mount the policy holds, as a device, and the shares the guest
/// agent is told to mount.
pub fn devices(
    policy: &Policy,
    log: &AuditLog,
    cache: FsCache,
    quota: Option<u64>,
    supervisor: Arc<dyn FsSupervisor>,
) -> Result<(Vec<FsConfig>, Vec<Share>)> {
    let mut configs = Vec::new();
    let mut shares = Vec::new();
    // All the session's shares together take at most half the user's
    // inotify watches (under `auto`).
    let watches = WatchBudget::for_this_user();
    let quota = quota.map(ShareQuota::new);
    for (i, m) in policy.mounts().iter().enumerate() {
        if let Err(e) = check_guest_path(m.guest) {
            fail!(Invalid, "mount {} ({}): {e}", m.rule.id, m.rule.location);
        }
        if !m.host.is_dir() {
            fail!(
                Invalid,
                "mount `{}` ({}) shares {}, which is not a directory on this host; create it or change the rule",
                m.rule.id,
                m.rule.location,
                m.host.display()
            );
        }
        let tag = format!("sbx{i}");
        let mode = if m.read_only { "ro" } else { "rw" };
        let resource = format!("{}:{}:{mode}", m.host.display(), m.guest);
        log.record(Entry::mounted(&resource, m.rule, &tag, cache.as_str()))?;
        shares.push(Share {
            tag: tag.clone(),
            guest_path: m.guest.to_string(),
            read_only: m.read_only,
        });
        configs.push(FsConfig {
            tag,
            host_dir: m.host.to_path_buf(),
            guest_path: m.guest.to_string(),
            read_only: m.read_only,
            mount_rule: rule_ref(m.rule),
            cache,
            supervisor: supervisor.clone(),
            watches: watches.clone(),
            quota: quota.clone(),
        });
    }
    Ok((configs, shares))
}

/// The session's side of every share: the policy decides, the audit log
/// hears refusals and (coalesced) changes, and host edits go to the guest
/// agent (see `host_edits`).
pub struct FileSupervisor {
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    changes: Arc<Changes>,
    host_edits: Sender<HostChanges>,
    limits: Arc<Limits>,
}

impl FileSupervisor {
    /// Starts the thread that writes coalesced changes every few seconds.
    pub fn new(
        policy: Arc<Policy>,
        log: Arc<AuditLog>,
        host_edits: Sender<HostChanges>,
        limits: Arc<Limits>,
    ) -> Result<Arc<FileSupervisor>> {
        let changes = Arc::new(Changes::default());
        let (c, l) = (changes.clone(), log.clone());
        sbx_seccomp::spawn("file-events", sbx_seccomp::Kind::Audit, move || c.run(&l))
            .at(|| "cannot start the file-events thread".into())?;
        Ok(Arc::new(FileSupervisor {
            policy,
            log,
            changes,
            host_edits,
            limits,
        }))
    }

    /// Writes what is pending (at session end).
    pub fn flush(&self) {
        self.changes.flush(&self.log);
    }
}

impl FsSupervisor for FileSupervisor {
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
            rule: rule_ref(d.rule),
            reason: d.reason.to_string(),
        })
    }

    fn denied(&self, op: &str, path: &str, refusal: &Refusal) {
        // Refused either way; past the limit, counted rather than written.
        if !self.limits.refusals.admit() {
            return;
        }
        let rule = RuleCite {
            id: &refusal.rule.id,
            layer: &refusal.rule.layer,
            location: refusal.rule.location.as_deref(),
        };
        if let Err(e) = self
            .log
            .record(Entry::fs_denied(op, path, &rule, &refusal.reason))
        {
            tracing::error!("{e}");
        }
    }

    fn changed(&self, change: Change, path: &str) {
        self.changes.add(change, path);
    }

    fn leaving_link(&self, path: &str, target: &str) -> Option<Refusal> {
        let decision = self.policy.decide_leaving_link(path, target);
        if let Some(d) = decision.as_ref().filter(|d| !d.allowed()) {
            return Some(Refusal {
                rule: rule_ref(d.rule),
                reason: d.reason.to_string(),
            });
        }
        if self.limits.leaving_links.admit() {
            let written = match &decision {
                // A rule in audit mode: its decision is the record.
                Some(d) => self.log.decision(Surface::Fs, "symlink", path, d).map(drop),
                None => self.log.record(Entry::leaving_link(path, target)).map(drop),
            };
            if let Err(e) = written {
                tracing::error!("{e}");
            }
        }
        None
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
        let entry = Entry::file_changes(&summary.join(", "), serde_json::Value::Object(details));
        if let Err(e) = log.record(entry) {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
