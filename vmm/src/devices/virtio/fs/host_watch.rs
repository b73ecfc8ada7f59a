//! Host edits a caching guest would otherwise miss. The guest kernel keeps
//! names, attributes and data for as long as the device said it may (long,
//! so that scans and `git status` do not ask again for every file), and
//! Linux's virtio-fs has no way for the device to take that back. So the
//! VMM watches, with inotify, every host directory the guest has been
//! given, and reports what changed there to the session, whose guest agent
//! revalidates exactly those names.
//!
//! Changes the guest itself makes through the device are not reported: the
//! guest kernel already knows them. Events lost to an inotify overflow, or
//! directories that could not be watched, are reported as "everything".

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::beneath::{cstr, open_beneath, open_root};

/// What the guest may hold stale after host edits: the guest paths of
/// changed entries, and mount roots whose every entry may have changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostChanges {
    pub paths: Vec<String>,
    pub trees: Vec<String>,
}

impl HostChanges {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.trees.is_empty()
    }
}

/// Child events of a watched directory: every way a name, its attributes
/// or its data can change. Events on the directory itself show up in its
/// parent's watch under its name.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// How long after the guest changed a name an event for it may be the echo
/// of that change. Inside it, an event is dropped only while the host file
/// is as the guest's change left it; later events are always reported.
const OWN_WINDOW: Duration = Duration::from_millis(1500);
/// Marks kept before old ones are swept.
const OWN_SWEEP: usize = 8192;
/// Events keep arriving in bursts (a save is a create, writes and a
/// rename): a batch is sent once the host has been quiet this long...
const QUIET: Duration = Duration::from_millis(20);
/// ...or this long after its first event, whichever comes first.
const BATCH: Duration = Duration::from_millis(100);
/// How long events are left to gather after a wake-up.
const GATHER: Duration = Duration::from_millis(10);
/// Watches a session's shares may hold together at most, and at most half
/// the host user's allowance (`fs.inotify.max_user_watches`, which the
/// user's editor and other tools share): a guest that walks huge trees in
/// several shares must not use it up.
const MAX_WATCHES: usize = 256 * 1024;
/// Where the host user's allowance is read.
pub const USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// The host user's inotify watch allowance, if it can be read.
pub fn user_watches() -> Option<usize> {
    std::fs::read_to_string(USER_WATCHES)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Watches a session's shares may hold together when the user may hold
/// `user`.
pub fn share_watches(user: usize) -> usize {
    (user / 2).min(MAX_WATCHES)
}

/// The inotify watches a session's shares may still take, shared by all of
/// them: each watched directory takes one, each forgotten one gives it back.
#[derive(Debug)]
pub struct WatchBudget(AtomicUsize);

impl WatchBudget {
    /// [`share_watches`] of this user's allowance.
    pub fn for_this_user() -> Arc<WatchBudget> {
        WatchBudget::new(user_watches().map_or(MAX_WATCHES, share_watches))
    }

    pub fn new(watches: usize) -> Arc<WatchBudget> {
        Arc::new(WatchBudget(AtomicUsize::new(watches)))
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.0.fetch_add(n, Ordering::AcqRel);
    }

    /// What is left.
    pub fn left(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Paths per batch; past it the whole mount is reported instead.
const MAX_PATHS: usize = 4096;

/// One event, as the guard needs it: the guest inode of the watched
/// directory and the name that changed in it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    Name(u64, Vec<u8>),
    /// Events were dropped: anything may have changed.
    Lost,
}

/// A host entry as far as telling a host edit from the guest's own:
/// changed data, attributes or a replacement all show here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Absent,
    Present {
        ino: u64,
        size: u64,
        mtime: (i64, u32),
        ctime: (i64, u32),
    },
    /// Could not be read: never taken for an echo.
    Unknown,
}

/// The guest changed a name: when, where the name is inside the mount,
/// and the host entry its change left (`None` while the change is under
/// way).
struct Own {
    at: Instant,
    rel: Vec<u8>,
    after: Option<State>,
}

pub(super) struct HostWatch {
    inotify: OwnedFd,
    /// The mount's root, which every watched path is resolved beneath.
    root: OwnedFd,
    /// Watch descriptor to the guest inode of the directory.
    dirs: Mutex<HashMap<i32, u64>>,
    /// (directory inode, name) to the guest's last change of it.
    own: Mutex<HashMap<(u64, Vec<u8>), Own>>,
    /// A directory could not be watched (the watch limit): the
    /// guard must not promise long timeouts any more.
    incomplete: AtomicBool,
    budget: Arc<WatchBudget>,
}

impl Drop for HostWatch {
    /// Closing the inotify descriptor ends every watch on it.
    fn drop(&mut self) {
        let held = self.dirs.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.budget.give_back(held);
    }
}

impl HostWatch {
    pub(super) fn new(root: &Path, budget: Arc<WatchBudget>) -> io::Result<HostWatch> {
        // SAFETY: plain syscalls; each descriptor is owned at once.
        let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if inotify < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor inotify_init1 just returned, owned by nobody else.
        let inotify = unsafe { OwnedFd::from_raw_fd(inotify) };
        Ok(HostWatch {
            inotify,
            root: open_root(root)?,
            dirs: Mutex::new(HashMap::new()),
            own: Mutex::new(HashMap::new()),
            incomplete: AtomicBool::new(false),
            budget,
        })
    }

    pub(super) fn fd(&self) -> i32 {
        self.inotify.as_raw_fd()
    }

    pub(super) fn incomplete(&self) -> bool {
        self.incomplete.load(Ordering::Relaxed)
    }

    /// Watches the directory at `rel` (inside the mount, empty for the
    /// root) for guest inode `inode`. Resolved beneath the root without
    /// following any symlink, so a guest racing renames cannot make the
    /// VMM watch, and report on, a directory outside the mount.
    pub(super) fn add(&self, inode: u64, rel: &[u8]) -> Option<i32> {
        let wd = if self.budget.take() {
            self.add_watch(rel)
                .inspect_err(|_| self.budget.give_back(1))
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        };
        match wd {
            Ok(wd) => {
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(wd, inode);
                Some(wd)
            }
            Err(e) => {
                // Gone already (a race with a delete) costs nothing; a full
                // watch table means host edits could go unseen.
                if e.raw_os_error() == Some(libc::ENOSPC) && !self.incomplete() {
                    tracing::warn!(
                        "virtio-fs: no more inotify watches for this session's shares (together \
                         at most half of fs.inotify.max_user_watches); host edits now reach the \
                         guest within a second instead of at once"
                    );
                    self.incomplete.store(true, Ordering::Relaxed);
                } else if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::debug!(error = %e, "virtio-fs: cannot watch a directory");
                }
                None
            }
        }
    }

    /// Opens `rel` (inside the mount, empty for the root) as a path
    /// descriptor; `None` stands for the root itself.
    fn open_beneath(&self, rel: &[u8], flags: i32) -> io::Result<Option<OwnedFd>> {
        if rel.is_empty() {
            return Ok(None);
        }
        open_beneath(&self.root, rel, libc::O_PATH | flags).map(Some)
    }

    /// The host entry at `rel` now.
    fn state(&self, rel: &[u8]) -> State {
        let fd = match self.open_beneath(rel, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return State::Absent,
            Err(_) => return State::Unknown,
        };
        let fd = fd.as_ref().map_or(self.root.as_raw_fd(), |d| d.as_raw_fd());
        // SAFETY: statx is plain integers; all zeroes is a valid value.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: statx writes one struct we own; the path is empty with
        // AT_EMPTY_PATH, so it reads the descriptor itself.
        let rc = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        if rc != 0 {
            return State::Unknown;
        }
        State::Present {
            ino: st.stx_ino,
            size: st.stx_size,
            mtime: (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
            ctime: (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
        }
    }

    fn add_watch(&self, rel: &[u8]) -> io::Result<i32> {
        let dir = self.open_beneath(rel, libc::O_DIRECTORY)?;
        let fd = dir
            .as_ref()
            .map_or(self.root.as_raw_fd(), |d| d.as_raw_fd());
        // inotify takes a path; the descriptor's magic link names exactly
        // the directory just opened.
        let path = cstr(Path::new(&format!("/proc/self/fd/{fd}")))?;
        // SAFETY: a valid path string and our own inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    pub(super) fn remove(&self, wd: i32) {
        let held = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&wd);
        if held.is_some() {
            self.budget.give_back(1);
        }
        // SAFETY: removes a watch from our own descriptor; a stale wd fails harmlessly.
        unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
    }

    /// The guest is about to change `name` in directory `dir`, which is
    /// `rel` inside the mount; [`HostWatch::settle`] follows the change.
    pub(super) fn own(&self, dir: u64, name: &[u8], rel: Vec<u8>) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if own.len() >= OWN_SWEEP {
            own.retain(|_, o| now.duration_since(o.at) < OWN_WINDOW);
        }
        let mark = Own {
            at: now,
            rel,
            after: None,
        };
        own.insert((dir, name.to_vec()), mark);
    }

    /// The guest's change of `name` in `dir` is done (or failed): records
    /// the host entry it left, which its echo will find.
    pub(super) fn settle(&self, dir: u64, name: &[u8]) {
        let key = (dir, name.to_vec());
        let rel = match self.own.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            Some(o) => o.rel.clone(),
            None => return,
        };
        let after = self.state(&rel);
        if let Some(o) = self
            .own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
        {
            o.after = Some(after);
        }
    }

    /// Whether an event for `name` in `dir` is the echo of the guest's own
    /// change: it came soon after, and the host entry is still as that
    /// change left it (or the change is still under way).
    fn is_own(&self, dir: u64, name: &[u8]) -> bool {
        let (rel, after) = {
            let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            // Borrowed lookups need the key's own type; names are short.
            match own.get(&(dir, name.to_vec())) {
                Some(o) if o.at.elapsed() < OWN_WINDOW => (o.rel.clone(), o.after),
                _ => return false,
            }
        };
        match after {
            None => true,
            Some(State::Unknown) => false,
            Some(after) => self.state(&rel) == after,
        }
    }

    /// Reads what is queued, without blocking.
    pub(super) fn read(&self) -> Vec<Seen> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n =
                unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            self.parse(&buf[..n as usize], &mut out);
        }
    }

    fn parse(&self, mut buf: &[u8], out: &mut Vec<Seen>) {
        const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
        while buf.len() >= HEAD {
            let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap_or([0; 4]));
            let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
            let Some(name) = buf.get(HEAD..HEAD + len) else {
                return;
            };
            buf = &buf[HEAD + len..];
            if mask & libc::IN_Q_OVERFLOW != 0 {
                out.push(Seen::Lost);
                continue;
            }
            if mask & libc::IN_IGNORED != 0 {
                // The directory is gone; its name's event came through the parent.
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&wd);
                continue;
            }
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if name.is_empty() {
                continue;
            }
            let dir = self
                .dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&wd)
                .copied();
            match dir {
                Some(dir) if !self.is_own(dir, name) => out.push(Seen::Name(dir, name.to_vec())),
                _ => {}
            }
        }
    }
}

/// Waits for host edits and gathers one batch: the first event, then
/// until the host is quiet (or the batch is old enough). `None` once `stop`
/// is readable; `path` turns a watched directory's inode into its guest
/// path, or `None` if the guest no longer knows it.
pub(super) fn next_batch(
    watch: &HostWatch,
    stop: i32,
    root: &str,
    path: impl Fn(u64) -> Option<String>,
) -> Option<HostChanges> {
    let mut paths = BTreeSet::new();
    let mut lost = false;
    let mut first: Option<Instant> = None;
    loop {
        let wait = match first {
            None => -1,
            Some(t) => {
                let left = BATCH.saturating_sub(t.elapsed()).min(QUIET);
                if left.is_zero() {
                    break;
                }
                left.as_millis().max(1) as i32
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: watch.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two descriptors in an array we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if fds[1].revents != 0 {
            return None;
        }
        if n == 0 {
            if first.is_some() {
                break;
            }
            continue;
        }
        // Events come in bursts, mostly the echo of the guest's own work:
        // let them gather rather than wake for each one.
        std::thread::sleep(GATHER);
        for seen in watch.read() {
            match seen {
                Seen::Lost => lost = true,
                Seen::Name(dir, name) => {
                    if let Some(d) = path(dir) {
                        paths.insert(format!("{d}/{}", String::from_utf8_lossy(&name)));
                    }
                }
            }
        }
        if first.is_none() && (lost || !paths.is_empty()) {
            first = Some(Instant::now());
        }
    }
    if lost || paths.len() > MAX_PATHS {
        return Some(HostChanges {
            paths: Vec::new(),
            trees: vec![root.to_string()],
        });
    }
    Some(HostChanges {
        paths: paths.into_iter().collect(),
        trees: Vec::new(),
    })
}
