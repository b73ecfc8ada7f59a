//! The policy between the guest and the host directory: a [`FileSystem`]
//! that checks every request and hands the allowed ones to fuse-backend-rs's
//! `PassthroughFs`.
//!
//! The guest kernel is not trusted to be Linux's: requests are checked as
//! if a hostile driver wrote them. What keeps lookups inside the mount is
//! the passthrough's handle-based walk (each name is opened with
//! `O_PATH | O_NOFOLLOW` relative to its parent's descriptor, so symlinks
//! are never followed on the host and `..` never leaves a directory); what
//! this layer adds is:
//! - names are single components: no `.`, `..`, `/` or empty names;
//! - read-only mounts refuse every write-type request with EROFS;
//! - the policy's deny rules refuse paths (and hide them from listings);
//! - no device nodes, FIFOs or sockets are created, no setuid or setgid bit
//!   is set, ownership stays the host user's, and only regular files and
//!   directories are ever opened on the host;
//! - a directory rename that would carry a denied path out from under its
//!   rule is refused;
//! - every refusal is reported, and so is every change, for the audit log;
//! - under `auto`, host edits are watched for and reported so the guest can
//!   drop what it cached ([`super::host_watch`]).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::host_watch::{self, HostChanges, HostWatch};
use super::listing::{self, Listings, Offer, READ_MAX};
use super::{Change, FsAccess, FsCache, FsConfig, FsPolicy, Refusal, GUARD_RULE};

/// How many entries a directory rename may carry before it is refused with
/// EXDEV (tools then copy and delete, one checked file at a time).
const RENAME_WALK_LIMIT: usize = 20_000;

const SETID: u32 = libc::S_ISUID | libc::S_ISGID;

/// What `auto` promises when host edits cannot be watched: a name or an
/// attribute is trusted for a second, then asked for again.
const UNWATCHED_TIMEOUT: Duration = Duration::from_secs(1);

/// What the guest was given for one inode: where it was last seen, and how
/// many lookups it holds (FUSE's reference count).
struct Node {
    parent: u64,
    name: Vec<u8>,
    mode: u32,
    lookups: u64,
    /// The inotify watch on a directory, under `auto`.
    watch: Option<i32>,
}

pub struct Guard {
    inner: PassthroughFs<()>,
    policy: Arc<dyn FsPolicy>,
    host_root: PathBuf,
    guest_root: String,
    read_only: bool,
    mount_rule: String,
    /// Under `auto`: the watch that makes long timeouts safe. Without it
    /// (or once it cannot cover a directory) timeouts are a second.
    watch: Option<HostWatch>,
    /// How long the guest may trust names, their absence and attributes.
    cache: FsCache,
    nodes: Mutex<HashMap<u64, Node>>,
    /// Handles that have been written through since they were opened, so a
    /// file's change is reported once per open, not once per write.
    written: Mutex<HashSet<u64>>,
    /// The mount's root, to open directories beneath for listing.
    root: Option<OwnedFd>,
    listings: Listings,
}

/// The path of `inode` inside the mount (`a/b`, empty for the root).
fn rel_in(nodes: &HashMap<u64, Node>, inode: u64) -> io::Result<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut at = inode;
    while at != ROOT_ID {
        // A cycle cannot be built (renames only move named entries), but
        // a bound keeps a bug from hanging the device.
        if parts.len() > 4096 {
            return Err(err(libc::ELOOP));
        }
        let n = nodes.get(&at).ok_or_else(|| err(libc::EBADF))?;
        parts.push(&n.name);
        at = n.parent;
    }
    parts.reverse();
    Ok(parts.join(&b'/'))
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// File ownership is the host user's, whoever the guest says is asking:
/// the passthrough then never switches credentials.
fn squash(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

fn writes(flags: u32) -> bool {
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY || f & (libc::O_TRUNC | libc::O_APPEND) != 0
}

fn file_type(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFLNK => "a symlink",
        _ => "a special file",
    }
}

impl Guard {
    pub fn new(inner: PassthroughFs<()>, config: &FsConfig) -> Self {
        let watch = match config.cache {
            FsCache::Auto => match HostWatch::new(&config.host_dir) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        dir = %config.host_dir.display(),
                        "virtio-fs: cannot watch for host edits; the guest trusts its cache for a second only"
                    );
                    None
                }
            },
            _ => None,
        };
        let root_watch = watch.as_ref().and_then(|w| w.add(ROOT_ID, b""));
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Node {
                parent: ROOT_ID,
                name: Vec::new(),
                mode: libc::S_IFDIR,
                lookups: 1,
                watch: root_watch,
            },
        );
        Self {
            inner,
            policy: config.policy.clone(),
            host_root: config.host_dir.clone(),
            guest_root: config.guest_path.clone(),
            read_only: config.read_only,
            mount_rule: config.mount_rule.clone(),
            watch,
            cache: config.cache,
            nodes: Mutex::new(nodes),
            written: Mutex::new(HashSet::new()),
            // Without it, the passthrough lists directories itself.
            root: host_watch::open_root(&config.host_dir).ok(),
            listings: Listings::default(),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<u64, Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The path of `inode` inside the mount (`a/b`, empty for the root).
    fn rel(&self, inode: u64) -> io::Result<Vec<u8>> {
        rel_in(&self.nodes(), inode)
    }

    fn guest_path(&self, rel: &[u8]) -> String {
        let rel = String::from_utf8_lossy(rel);
        if rel.is_empty() {
            self.guest_root.clone()
        } else {
            format!("{}/{rel}", self.guest_root)
        }
    }

    pub(super) fn path_of(&self, inode: u64) -> io::Result<String> {
        Ok(self.guest_path(&self.rel(inode)?))
    }

    /// The guest path of `name` in `parent`, once `name` is known to be one
    /// plain component.
    fn child(&self, op: &str, parent: u64, name: &CStr) -> io::Result<String> {
        Ok(self.guest_path(&self.child_rel(op, parent, name)?))
    }

    /// As [`Guard::child`], as a path inside the mount, bytes as on the host.
    fn child_rel(&self, op: &str, parent: u64, name: &CStr) -> io::Result<Vec<u8>> {
        let n = name.to_bytes();
        if n.is_empty() || n == b"." || n == b".." || n.contains(&b'/') {
            let at = self
                .path_of(parent)
                .unwrap_or_else(|_| self.guest_root.clone());
            self.refuse(
                op,
                &format!("{at}/{}", String::from_utf8_lossy(n)),
                "a name must be one path component (no `.`, `..` or `/`)",
                libc::EINVAL,
            )?;
        }
        self.rel_child(parent, n)
    }

    /// The path of `name` in directory `parent` inside the mount.
    fn rel_child(&self, parent: u64, name: &[u8]) -> io::Result<Vec<u8>> {
        let mut rel = self.rel(parent)?;
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name);
        Ok(rel)
    }

    /// The file type bits of an inode the guest was given.
    fn mode_of(&self, inode: u64) -> Option<u32> {
        self.nodes().get(&inode).map(|n| n.mode)
    }

    /// Refuses with one of the device's own protections.
    fn refuse(&self, op: &str, path: &str, reason: &str, code: i32) -> io::Result<()> {
        let refusal = Refusal {
            rule: GUARD_RULE.into(),
            reason: reason.into(),
        };
        self.policy.denied(op, path, &refusal);
        Err(err(code))
    }

    /// Reads and writes of `path` as the mount and the policy allow them.
    fn check(&self, op: &str, path: &str, access: FsAccess) -> io::Result<()> {
        let (refusal, code) = if access == FsAccess::Write && self.read_only {
            let r = Refusal {
                rule: self.mount_rule.clone(),
                reason: format!("{} is a read-only mount", self.guest_root),
            };
            (r, libc::EROFS)
        } else {
            match self.policy.check(path, access) {
                None => return Ok(()),
                Some(r) => (r, libc::EACCES),
            }
        };
        self.policy.denied(op, path, &refusal);
        Err(err(code))
    }

    fn remember(&self, parent: u64, name: &[u8], inode: u64, mode: u32) {
        let mut nodes = self.nodes();
        let n = nodes.entry(inode).or_insert(Node {
            parent,
            name: Vec::new(),
            mode,
            lookups: 0,
            watch: None,
        });
        n.parent = parent;
        n.name = name.to_vec();
        n.mode = mode;
        n.lookups += 1;
        let new_dir = n.lookups == 1 && mode & libc::S_IFMT == libc::S_IFDIR;
        // Watched before the guest hears of it, so no edit falls between.
        if let (true, Some(w)) = (new_dir, &self.watch) {
            let wd = rel_in(&nodes, inode)
                .ok()
                .and_then(|rel| w.add(inode, &rel));
            if let Some(n) = nodes.get_mut(&inode) {
                n.watch = wd;
            }
        }
    }

    fn drop_lookups(&self, inode: u64, count: u64) {
        let mut nodes = self.nodes();
        if let Some(n) = nodes.get_mut(&inode) {
            n.lookups = n.lookups.saturating_sub(count);
            if n.lookups == 0 && inode != ROOT_ID {
                if let (Some(w), Some(wd)) = (&self.watch, n.watch) {
                    w.remove(wd);
                }
                nodes.remove(&inode);
            }
        }
    }

    /// The guest is about to change `name` in `parent`: the host's echo of
    /// it is not a host edit. Keep the mark until the change is done; its
    /// drop records what the change left on the host.
    fn own(&self, parent: u64, name: &[u8]) -> Echo<'_> {
        let Some(w) = &self.watch else {
            return Echo(None);
        };
        let Ok(rel) = self.rel_child(parent, name) else {
            return Echo(None);
        };
        w.own(parent, name, rel);
        Echo(Some((w, parent, name.to_vec())))
    }

    /// As [`Guard::own`], for the name the guest knows `inode` by.
    fn own_inode(&self, inode: u64) -> Echo<'_> {
        // Without a watch there is nothing to mark: every write comes here.
        if self.watch.is_none() {
            return Echo(None);
        }
        let known = self.nodes().get(&inode).map(|n| (n.parent, n.name.clone()));
        known.map_or(Echo(None), |(parent, name)| self.own(parent, &name))
    }

    /// The longest the guest may trust what it is told now: under `auto`,
    /// a second unless every directory it knows is watched.
    fn trust(&self) -> Option<Duration> {
        let watched = self.watch.as_ref().is_some_and(|w| !w.incomplete());
        (self.cache == FsCache::Auto && !watched).then_some(UNWATCHED_TIMEOUT)
    }

    fn fit(&self, mut e: Entry) -> Entry {
        if let Some(t) = self.trust() {
            e.entry_timeout = e.entry_timeout.min(t);
            e.attr_timeout = e.attr_timeout.min(t);
        }
        e
    }

    fn fit_attr(&self, (attr, timeout): (stat64, Duration)) -> (stat64, Duration) {
        (attr, self.trust().map_or(timeout, |t| timeout.min(t)))
    }

    /// Waits for the next batch of host edits, leaving out what the policy
    /// hides from the guest. `None` once `stop` is readable, or when
    /// nothing is watched.
    pub(super) fn host_changes(&self, stop: i32) -> Option<HostChanges> {
        let w = self.watch.as_ref()?;
        let mut c =
            host_watch::next_batch(w, stop, &self.guest_root, |dir| self.path_of(dir).ok())?;
        c.paths
            .retain(|p| self.policy.check(p, FsAccess::Read).is_none());
        Some(c)
    }

    /// Reports host edits to the session until `stop` is readable.
    pub(super) fn watch_host(&self, stop: i32) {
        while let Some(c) = self.host_changes(stop) {
            if !c.is_empty() {
                self.policy.host_changed(&c);
            }
        }
    }

    pub(super) fn watches_host(&self) -> bool {
        self.watch.is_some()
    }

    #[cfg(test)]
    pub(super) fn limit_watches(&mut self, n: usize) {
        if let Some(w) = &mut self.watch {
            w.limit(n);
        }
    }

    /// Would renaming the directory at `guest` (host `host`) move something a
    /// deny rule covers? Walks the host tree without following symlinks.
    fn carries_denied(&self, host: &Path, guest: &str) -> Result<Option<(String, Refusal)>, ()> {
        let mut stack = vec![(host.to_path_buf(), guest.to_string())];
        let mut seen = 0usize;
        while let Some((dir, gdir)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                seen += 1;
                if seen > RENAME_WALK_LIMIT {
                    return Err(());
                }
                let g = format!("{gdir}/{}", e.file_name().to_string_lossy());
                if let Some(refusal) = self.policy.check(&g, FsAccess::Read) {
                    return Ok(Some((g, refusal)));
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), g));
                }
            }
        }
        Ok(None)
    }

    fn created(&self, parent: u64, name: &CStr, path: &str, e: Entry) -> Entry {
        self.remember(parent, name.to_bytes(), e.inode, e.attr.st_mode);
        self.policy.changed(Change::Created, path);
        self.fit(e)
    }
}

/// A change the guest is making, from [`Guard::own`] until dropped.
struct Echo<'a>(Option<(&'a HostWatch, u64, Vec<u8>)>);

impl Drop for Echo<'_> {
    fn drop(&mut self) {
        if let Some((w, dir, name)) = &self.0 {
            w.settle(*dir, name);
        }
    }
}

impl FileSystem for Guard {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        // Every open must come to us to be checked, and there is no DAX window.
        opts.remove(
            FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR | FsOptions::PERFILE_DAX,
        );
        // Each request is a guest exit, so fewer and bigger: writes of up to
        // 1 MiB (without these, one page each), and O_TRUNC carried by the
        // open rather than sent again as a setattr. And a host edit that
        // keeps a file's size still drops the guest's cached data once the
        // guest sees the new mtime.
        opts |= capable
            & (FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::ATOMIC_O_TRUNC
                | FsOptions::AUTO_INVAL_DATA);
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let path = self.child("lookup", parent, name)?;
        self.check("lookup", &path, FsAccess::Read)?;
        match self.inner.lookup(ctx, parent, name) {
            Ok(e) => {
                self.remember(parent, name.to_bytes(), e.inode, e.attr.st_mode);
                Ok(self.fit(e))
            }
            // Absent names are cached as long as present ones (inode 0 is
            // FUSE's negative entry): builds, imports and git look for the
            // same missing files again and again.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && self.cache != FsCache::Never => {
                Ok(self.fit(Entry {
                    inode: 0,
                    generation: 0,
                    // SAFETY: stat64 is plain integers; all zeroes is a valid value.
                    attr: unsafe { std::mem::zeroed() },
                    attr_flags: 0,
                    attr_timeout: Duration::ZERO,
                    // As long as the passthrough trusts present names.
                    entry_timeout: self.cache.passthrough().1,
                }))
            }
            Err(e) => Err(e),
        }
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.drop_lookups(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        Ok(self.fit_attr(self.inner.getattr(ctx, inode, handle)?))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        mut valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let path = self.path_of(inode)?;
        self.check("setattr", &path, FsAccess::Write)?;
        if valid.contains(SetattrValid::MODE) && attr.st_mode & SETID != 0 {
            self.refuse(
                "chmod",
                &path,
                "setuid and setgid bits cannot be set in a mount",
                libc::EPERM,
            )?;
        }
        // Ownership stays the host user's; a guest chown is a no-op.
        valid.remove(SetattrValid::UID | SetattrValid::GID);
        let _echo = self.own_inode(inode);
        let out = self
            .inner
            .setattr(&squash(ctx), inode, attr, handle, valid)?;
        if valid.intersects(SetattrValid::SIZE | SetattrValid::MODE | SetattrValid::MTIME) {
            self.policy.changed(Change::Written, &path);
        }
        Ok(self.fit_attr(out))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        // The target is returned as text and resolved by the guest, in the
        // guest's own tree: it never names a host file.
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let path = self.child("symlink", parent, name)?;
        self.check("symlink", &path, FsAccess::Write)?;
        let _echo = self.own(parent, name.to_bytes());
        let e = self.inner.symlink(&squash(ctx), linkname, parent, name)?;
        Ok(self.created(parent, name, &path, e))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let path = self.child("mknod", parent, name)?;
        self.check("mknod", &path, FsAccess::Write)?;
        if mode & libc::S_IFMT != libc::S_IFREG {
            self.refuse(
                "mknod",
                &path,
                &format!(
                    "{} cannot be created in a mount (only files, directories and symlinks)",
                    file_type(mode)
                ),
                libc::EPERM,
            )?;
        }
        let _echo = self.own(parent, name.to_bytes());
        let e = self
            .inner
            .mknod(&squash(ctx), parent, name, mode & !SETID, rdev, umask)?;
        Ok(self.created(parent, name, &path, e))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let path = self.child("mkdir", parent, name)?;
        self.check("mkdir", &path, FsAccess::Write)?;
        let _echo = self.own(parent, name.to_bytes());
        let e = self
            .inner
            .mkdir(&squash(ctx), parent, name, mode & !SETID, umask)?;
        Ok(self.created(parent, name, &path, e))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let path = self.child("unlink", parent, name)?;
        self.check("unlink", &path, FsAccess::Write)?;
        let _echo = self.own(parent, name.to_bytes());
        self.inner.unlink(ctx, parent, name)?;
        self.policy.changed(Change::Deleted, &path);
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let path = self.child("rmdir", parent, name)?;
        self.check("rmdir", &path, FsAccess::Write)?;
        let _echo = self.own(parent, name.to_bytes());
        self.inner.rmdir(ctx, parent, name)?;
        self.policy.changed(Change::Deleted, &path);
        Ok(())
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let old_rel = self.child_rel("rename", olddir, oldname)?;
        let old = self.guest_path(&old_rel);
        let new = self.child("rename", newdir, newname)?;
        self.check("rename", &old, FsAccess::Write)?;
        self.check("rename", &new, FsAccess::Write)?;
        if flags & !libc::RENAME_NOREPLACE != 0 {
            // Exchange and whiteout would move two trees at once; nothing a
            // workspace needs.
            return self.refuse(
                "rename",
                &old,
                "only plain renames are supported (no exchange or whiteout)",
                libc::EINVAL,
            );
        }
        // The host's bytes, not the guest path's lossy text: a name that is
        // not UTF-8 must still be found and walked.
        let host_old = self.host_root.join(OsStr::from_bytes(&old_rel));
        if std::fs::symlink_metadata(&host_old).is_ok_and(|m| m.is_dir()) {
            match self.carries_denied(&host_old, &old) {
                Ok(None) => {}
                Ok(Some((inside, r))) => {
                    let refusal = Refusal {
                        reason: format!("it holds {inside}, which must stay put: {}", r.reason),
                        rule: r.rule,
                    };
                    self.policy.denied("rename", &old, &refusal);
                    return Err(err(libc::EACCES));
                }
                // Too big to check: tools fall back to copying, file by file.
                Err(()) => return Err(err(libc::EXDEV)),
            }
        }
        let _old = self.own(olddir, oldname.to_bytes());
        let _new = self.own(newdir, newname.to_bytes());
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)?;
        {
            let mut nodes = self.nodes();
            // The entry the guest holds for the old name now lives at the new one.
            if let Some(n) = nodes
                .values_mut()
                .find(|n| n.parent == olddir && n.name == oldname.to_bytes())
            {
                n.parent = newdir;
                n.name = newname.to_bytes().to_vec();
            }
        }
        self.policy
            .changed(Change::Renamed, &format!("{old} -> {new}"));
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let path = self.child("link", newparent, newname)?;
        self.check("link", &path, FsAccess::Write)?;
        let mode = self.mode_of(inode).ok_or_else(|| err(libc::EBADF))?;
        if !matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK) {
            self.refuse(
                "link",
                &path,
                &format!("{} cannot be linked", file_type(mode)),
                libc::EPERM,
            )?;
        }
        let _echo = self.own(newparent, newname.to_bytes());
        let e = self.inner.link(&squash(ctx), inode, newparent, newname)?;
        Ok(self.created(newparent, newname, &path, e))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let path = self.path_of(inode)?;
        let mode = self.mode_of(inode).unwrap_or(0);
        if mode & libc::S_IFMT != libc::S_IFREG {
            self.refuse(
                "open",
                &path,
                &format!(
                    "{} on the host is never opened for the guest",
                    file_type(mode)
                ),
                libc::EACCES,
            )?;
        }
        let _echo = if writes(flags) {
            self.check("open", &path, FsAccess::Write)?;
            Some(self.own_inode(inode))
        } else {
            None
        };
        let out = self.inner.open(&squash(ctx), inode, flags, fuse_flags)?;
        if flags as i32 & libc::O_TRUNC != 0 {
            self.policy.changed(Change::Written, &path);
        }
        Ok(out)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let path = self.child("create", parent, name)?;
        self.check("create", &path, FsAccess::Write)?;
        args.mode &= !SETID;
        let _echo = self.own(parent, name.to_bytes());
        let (e, handle, opts, passthrough) = self.inner.create(&squash(ctx), parent, name, args)?;
        Ok((
            self.created(parent, name, &path, e),
            handle,
            opts,
            passthrough,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        if self.read_only {
            // Opens for writing were refused already; a forged handle is not.
            return Err(err(libc::EROFS));
        }
        let _echo = self.own_inode(inode);
        let n = self.inner.write(
            &squash(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )?;
        let first = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle);
        if first {
            if let Ok(path) = self.path_of(inode) {
                self.policy.changed(Change::Written, &path);
            }
        }
        Ok(n)
    }

    /// ENOSYS, so the guest kernel stops sending FLUSH (one per close of
    /// every descriptor). Writes reach the host as they are made and the
    /// guest gets no host locks, so a flush would have nothing to do.
    fn flush(&self, _: &Context, _: u64, _: u64, _: u64) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        if self.read_only {
            return Err(err(libc::EROFS));
        }
        let _echo = self.own_inode(inode);
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let mode = self.mode_of(inode).unwrap_or(0);
        if mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        let (handle, opts) = self.inner.opendir(ctx, inode, flags)?;
        if let Some(h) = handle {
            if let Some(dir) = self.own_dir(ctx, inode) {
                self.listings.open(h, inode, dir);
            }
        }
        Ok((handle, opts))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listed = self.list(inode, handle, size, offset, false, &mut |d| {
            Ok(match add_entry(d)? {
                0 => Offer::Full,
                _ => Offer::Given,
            })
        });
        if let Some(r) = listed {
            return r;
        }
        let dir = self.path_of(inode)?;
        self.inner
            .readdir(ctx, inode, handle, size, offset, &mut |d: DirEntry| {
                if self.hidden(&dir, d.name) {
                    // Skipped, not "buffer full": keep listing.
                    return Ok(1);
                }
                add_entry(d)
            })
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let listed = self.list(inode, handle, size, offset, true, &mut |d| {
            let Ok(name) = CString::new(d.name) else {
                return Ok(Offer::Skipped);
            };
            let e = match self.inner.lookup(ctx, inode, &name) {
                Ok(e) => e,
                // Deleted on the host since it was read.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Offer::Skipped),
                Err(e) => return Err(e),
            };
            let (ino, mode) = (e.inode, e.attr.st_mode);
            let d = DirEntry {
                ino: e.attr.st_ino,
                ..d
            };
            if add_entry(d, self.fit(e))? == 0 {
                self.inner.forget(ctx, ino, 1);
                return Ok(Offer::Full);
            }
            self.remember(inode, d.name, ino, mode);
            Ok(Offer::Given)
        });
        if let Some(r) = listed {
            return r;
        }
        let dir = self.path_of(inode)?;
        let mut hidden = Vec::new();
        let mut shown = Vec::new();
        let res = self.inner.readdirplus(
            ctx,
            inode,
            handle,
            size,
            offset,
            &mut |d: DirEntry, e: Entry| {
                if self.hidden(&dir, d.name) {
                    // The passthrough counted a lookup the guest never sees.
                    hidden.push(e.inode);
                    return Ok(1);
                }
                let (name, ino, mode) = (d.name.to_vec(), e.inode, e.attr.st_mode);
                let n = add_entry(d, self.fit(e))?;
                if n > 0 {
                    shown.push((name, ino, mode));
                }
                Ok(n)
            },
        );
        for i in hidden {
            self.inner.forget(ctx, i, 1);
        }
        for (name, ino, mode) in shown {
            self.remember(inode, &name, ino, mode);
        }
        res
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.listings.close(handle);
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 && self.read_only {
            return Err(err(libc::EROFS));
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

impl Guard {
    /// One listing request, plain or plus, from the directory's own
    /// descriptor ([`Listings`]); `None` when it has none, and the
    /// passthrough lists it. `give` puts an entry that the policy lets the
    /// guest see into the reply.
    fn list(
        &self,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        plus: bool,
        give: &mut dyn FnMut(DirEntry) -> io::Result<Offer>,
    ) -> Option<io::Result<()>> {
        let dir = match self.path_of(inode) {
            Ok(dir) => dir,
            Err(e) => return Some(Err(e)),
        };
        // A plus record is up to seven times a host entry's size: a page of
        // host entries would be several replies' worth. A quarter page
        // (still one long name) is about one.
        let count = if plus { size / 4 } else { size }.clamp(512, READ_MAX);
        let read = |d: &File, from, each: &mut dyn FnMut(DirEntry) -> io::Result<()>| {
            listing::read_dir(d, from, count, each)
        };
        self.listings
            .serve(handle, inode, offset, read, &mut |d: DirEntry| {
                if self.hidden(&dir, d.name) {
                    return Ok(Offer::Skipped);
                }
                give(d)
            })
    }

    /// A descriptor of directory `inode` to list it from, opened by its
    /// path beneath the root and taken only if it is the very directory
    /// the passthrough holds (a host rename since the guest looked it up
    /// would make the path another's).
    fn own_dir(&self, ctx: &Context, inode: u64) -> Option<File> {
        let root = self.root.as_ref()?;
        let rel = self.rel(inode).ok()?;
        let rel = if rel.is_empty() { b".".to_vec() } else { rel };
        let fd = host_watch::open_beneath(root, &rel, libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
        let dir = File::from(fd);
        let ours = dir.metadata().ok()?;
        let (theirs, _) = self.inner.getattr(ctx, inode, None).ok()?;
        (ours.dev() == theirs.st_dev && ours.ino() == theirs.st_ino).then_some(dir)
    }

    /// Listings leave out what the policy denies; `.` and `..` stay.
    fn hidden(&self, dir: &str, name: &[u8]) -> bool {
        if name == b"." || name == b".." {
            return false;
        }
        let path = format!("{dir}/{}", String::from_utf8_lossy(name));
        self.policy.check(&path, FsAccess::Read).is_some()
    }
}
