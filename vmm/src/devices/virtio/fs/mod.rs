//! virtio-fs: a host directory served to the guest as FUSE over virtio,
//! in-process. One device per mount; the guest agent mounts it by tag.
//!
//! Requests are decoded by fuse-backend-rs's hardened FUSE server and checked
//! by [`guard::Guard`] before its passthrough file system touches the host.
//! Under `--fs-cache auto`, [`host_watch`] reports host edits so the guest
//! can keep a long-lived cache and still see them.

mod beneath;
mod checks;
mod echo;
mod guard;
mod host_watch;
mod listing;
mod nodes;
mod worker;

#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, WorkerThread,
};
use crate::vstate::memory::GuestMemory;
pub use guard::Guard;
pub use host_watch::{share_watches, user_watches, HostChanges, WatchBudget, USER_WATCHES};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use worker::answer;

pub const DEVICE_TYPE: u32 = 26;
/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`
pub const TAG_LEN: usize = 36;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FsAccess {
    Read,
    Write,
}

/// A change the guest made in a read-write mount.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    Created,
    Written,
    Deleted,
    Renamed,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Written => "written",
            Change::Deleted => "deleted",
            Change::Renamed => "renamed",
        }
    }
}

/// The rule behind a refusal, as the audit log names it: a policy rule
/// with its layer and file:line, or one of the device's own protections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub id: String,
    pub layer: String,
    /// The rule's file and line; None for the device's own protections.
    pub location: Option<String>,
}

impl RuleRef {
    /// The device's own protections (names, special files, setuid bits,
    /// renames), which no policy rule makes.
    pub fn guard() -> RuleRef {
        RuleRef {
            id: GUARD_RULE.into(),
            layer: "builtin".into(),
            location: None,
        }
    }
}

/// Why a request was refused: the rule and a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub rule: RuleRef,
    pub reason: String,
}

/// The rule id of refusals that no policy rule makes.
pub const GUARD_RULE: &str = "fs-guard";

/// The session's side of a share: it decides what the guest may touch and
/// is told what the guest was refused and changed, and what the host
/// changed under the guest. Paths are guest paths (`/workspace/src/a.rs`).
pub trait FsSupervisor: Send + Sync {
    /// `None` if `path` may be accessed so; otherwise the refusal.
    fn check(&self, path: &str, access: FsAccess) -> Option<Refusal>;
    /// A request was refused (`op` is the FUSE operation).
    fn denied(&self, op: &str, path: &str, refusal: &Refusal);
    /// The guest changed `path` (for renames, `old -> new`).
    fn changed(&self, change: Change, path: &str);
    /// The guest is making a symlink at `path` whose `target` leaves the
    /// share: the refusal if it may not; otherwise the supervisor records it.
    fn leaving_link(&self, _path: &str, _target: &str) -> Option<Refusal> {
        None
    }
    /// The host changed what the guest may have cached (under `auto`):
    /// have the guest revalidate it.
    fn host_changed(&self, _changes: &HostChanges) {}
}

/// The bytes the guest may add to files in a session's shares, shared by
/// all of them: growth past a file's end (by writing or allocating) is
/// counted; past the quota, writes that would grow a file fail with
/// ENOSPC. Deleting gives nothing back, so the count is what the guest
/// wrote new during the session.
#[derive(Debug)]
pub struct ShareQuota {
    limit: u64,
    used: AtomicU64,
}

impl ShareQuota {
    pub fn new(limit: u64) -> Arc<ShareQuota> {
        Arc::new(ShareQuota {
            limit,
            used: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes added so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Whether `growth` more bytes fit.
    fn fits(&self, growth: u64) -> bool {
        self.used().saturating_add(growth) <= self.limit
    }

    fn add(&self, growth: u64) {
        self.used.fetch_add(growth, Ordering::AcqRel);
    }
}

/// How much of the host directory the guest kernel may cache.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsCache {
    /// Nothing: every access asks the host. Host edits show at once.
    Never,
    /// Names, attributes and data kept for a minute, and the host watched:
    /// each host edit is reported so the guest revalidates what it touched.
    /// Where a directory cannot be watched, a second.
    Auto,
    /// As `auto`, without the watch: for directories only this guest changes.
    Always,
}

impl FsCache {
    pub fn parse(s: &str) -> Option<FsCache> {
        match s {
            "never" => Some(FsCache::Never),
            "auto" => Some(FsCache::Auto),
            "always" => Some(FsCache::Always),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsCache::Never => "never",
            FsCache::Auto => "auto",
            FsCache::Always => "always",
        }
    }

    pub(super) fn passthrough(self) -> (CachePolicy, Duration) {
        match self {
            FsCache::Never => (CachePolicy::Never, Duration::ZERO),
            FsCache::Auto | FsCache::Always => (CachePolicy::Always, Duration::from_secs(60)),
        }
    }
}

#[derive(Clone)]
pub struct FsConfig {
    /// The name the guest mounts it by (at most 36 bytes).
    pub tag: String,
    pub host_dir: PathBuf,
    /// Where the guest mounts it; paths given to the policy start here.
    pub guest_path: String,
    pub read_only: bool,
    /// The rule that granted the mount (named when a write to a read-only
    /// mount is refused).
    pub mount_rule: RuleRef,
    pub cache: FsCache,
    pub supervisor: Arc<dyn FsSupervisor>,
    /// The inotify watches this share takes from, with the session's other
    /// shares (under `auto`).
    pub watches: Arc<WatchBudget>,
    /// The bytes the guest may add, with the session's other shares.
    pub quota: Option<Arc<ShareQuota>>,
}

impl std::fmt::Debug for FsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsConfig")
            .field("tag", &self.tag)
            .field("host_dir", &self.host_dir)
            .field("guest_path", &self.guest_path)
            .field("read_only", &self.read_only)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the virtio-fs tag `{0}` is empty or longer than 36 bytes")]
    Tag(String),
    #[error("cannot share {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the host-edit watcher of a shared directory: {0}")]
    Watch(#[source] ActivateError),
}

/// Builds the checked file system for `config` (the device's whole host side).
pub fn file_system(config: &FsConfig) -> Result<Guard, FsError> {
    let open_err = |source| FsError::Open {
        path: config.host_dir.clone(),
        source,
    };
    let meta = std::fs::metadata(&config.host_dir).map_err(open_err)?;
    if !meta.is_dir() {
        return Err(open_err(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let (cache_policy, timeout) = config.cache.passthrough();
    let cfg = Config {
        root_dir: config.host_dir.to_string_lossy().into_owned(),
        cache_policy,
        attr_timeout: timeout,
        entry_timeout: timeout,
        // Extended attributes could carry file capabilities or ACLs onto
        // host files; the guest does not get them.
        xattr: false,
        do_import: true,
        ..Config::default()
    };
    let inner = PassthroughFs::<()>::new(cfg).map_err(open_err)?;
    inner.import().map_err(open_err)?;
    Ok(Guard::new(inner, config))
}

pub struct Fs {
    tag: [u8; TAG_LEN],
    server: Arc<Server<Arc<Guard>>>,
    worker: Option<WorkerThread>,
    /// Reports host edits, for the device's whole life (not the driver's).
    watcher: Option<WorkerThread>,
}

impl Fs {
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        let bytes = config.tag.as_bytes();
        if bytes.is_empty() || bytes.len() > TAG_LEN {
            return Err(FsError::Tag(config.tag.clone()));
        }
        let mut tag = [0u8; TAG_LEN];
        tag[..bytes.len()].copy_from_slice(bytes);
        let guard = Arc::new(file_system(config)?);
        let watcher = if guard.watches_host() {
            let (stop, fd) = WorkerThread::stop_fds().map_err(FsError::Watch)?;
            let g = guard.clone();
            let run = move || g.watch_host(fd.as_raw_fd());
            Some(
                WorkerThread::start("sbx-fs-watch", sbx_seccomp::Kind::FsWatch, stop, run)
                    .map_err(FsError::Watch)?,
            )
        } else {
            None
        };
        Ok(Self {
            tag,
            server: Arc::new(Server::new(guard)),
            worker: None,
            watcher,
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        check_queues(&queues, &kicks, QUEUE_SIZES.len())?;
        let (stop, worker_stop) = WorkerThread::stop_fds()?;
        let worker = worker::Worker::new(mem, queues, interrupt, self.server.clone());
        let run = move || worker.run(kicks, worker_stop);
        self.worker = Some(WorkerThread::start(
            "sbx-fs",
            sbx_seccomp::Kind::Fs,
            stop,
            run,
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.reset();
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
    }
}
