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
//!
//! The checks are in [`super::checks`], the inode table in
//! [`super::nodes`], the guest's own changes in [`super::echo`] and the
//! listings in [`super::listing`]; this file wires them to each request.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::beneath;
use super::checks::{err, file_type, leaves_share, squash, writes, SETID};
use super::host_watch::{self, HostChanges, HostWatch};
use super::listing::{Listings, Offer};
use super::nodes::Nodes;
use super::{Change, FsAccess, FsCache, FsConfig, FsSupervisor, Refusal, RuleRef, ShareQuota};

/// The user sbx runs as, unless it is root.
fn host_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    (uid != 0).then_some((uid, gid))
}

/// What `auto` promises when host edits cannot be watched: a name or an
/// attribute is trusted for a second, then asked for again.
const UNWATCHED_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Guard {
    pub(super) inner: PassthroughFs<()>,
    pub(super) supervisor: Arc<dyn FsSupervisor>,
    pub(super) host_root: PathBuf,
    pub(super) guest_root: String,
    pub(super) read_only: bool,
    pub(super) mount_rule: RuleRef,
    /// Under `auto`: the watch that makes long timeouts safe. Without it
    /// (or once it cannot cover a directory) timeouts are a second.
    pub(super) watch: Option<HostWatch>,
    /// How long the guest may trust names, their absence and attributes.
    cache: FsCache,
    quota: Option<Arc<ShareQuota>>,
    pub(super) nodes: Nodes,
    /// Handles that have been written through since they were opened, so a
    /// file's change is reported once per open, not once per write.
    written: Mutex<HashSet<u64>>,
    /// The mount's root, to open directories beneath for listing.
    pub(super) root: Option<OwnedFd>,
    pub(super) listings: Listings,
    /// Run by an ordinary user: their uid and gid, which the guest sees
    /// as root's (see [`Guard::show_owner`]).
    owner: Option<(u32, u32)>,
}

impl Guard {
    pub fn new(inner: PassthroughFs<()>, config: &FsConfig) -> Self {
        let watch = match config.cache {
            FsCache::Auto => match HostWatch::new(&config.host_dir, config.watches.clone()) {
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
        Self {
            inner,
            supervisor: config.supervisor.clone(),
            host_root: config.host_dir.clone(),
            guest_root: config.guest_path.clone(),
            read_only: config.read_only,
            mount_rule: config.mount_rule.clone(),
            watch,
            cache: config.cache,
            quota: config.quota.clone(),
            nodes: Nodes::new(root_watch),
            written: Mutex::new(HashSet::new()),
            // Without it, the passthrough lists directories itself.
            root: beneath::open_root(&config.host_dir).ok(),
            listings: Listings::default(),
            owner: host_user(),
        }
    }

    pub(super) fn guest_path(&self, rel: &[u8]) -> String {
        let rel = String::from_utf8_lossy(rel);
        if rel.is_empty() {
            self.guest_root.clone()
        } else {
            format!("{}/{rel}", self.guest_root)
        }
    }

    pub(super) fn path_of(&self, inode: u64) -> io::Result<String> {
        Ok(self.guest_path(&self.nodes.rel(inode)?))
    }

    /// The guest was given `inode` as `name` in `parent`.
    fn remember(&self, parent: u64, name: &[u8], inode: u64, mode: u32) {
        self.nodes
            .remember(parent, name, inode, mode, self.watch.as_ref());
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
        self.show_owner(&mut e.attr);
        e
    }

    fn fit_attr(&self, (mut attr, timeout): (stat64, Duration)) -> (stat64, Duration) {
        self.show_owner(&mut attr);
        (attr, self.trust().map_or(timeout, |t| timeout.min(t)))
    }

    /// Files the guest makes belong to the host user sbx runs as, whoever
    /// the guest says made them. Run by root, the guest sees root's files
    /// as its root's; run by an ordinary user, it sees that user's files
    /// as its root's too (as a rootless container does), so guest tools
    /// that check ownership (git's safe.directory) work the same either way.
    fn show_owner(&self, attr: &mut stat64) {
        if let Some((uid, gid)) = self.owner {
            if attr.st_uid == uid {
                attr.st_uid = 0;
            }
            if attr.st_gid == gid {
                attr.st_gid = 0;
            }
        }
    }

    /// Waits for the next batch of host edits, leaving out what the policy
    /// hides from the guest. `None` once `stop` is readable, or when
    /// nothing is watched.
    pub(super) fn host_changes(&self, stop: i32) -> Option<HostChanges> {
        let w = self.watch.as_ref()?;
        let mut c =
            host_watch::next_batch(w, stop, &self.guest_root, |dir| self.path_of(dir).ok())?;
        c.paths
            .retain(|p| self.supervisor.check(p, FsAccess::Read).is_none());
        Some(c)
    }

    /// Reports host edits to the session until `stop` is readable.
    pub(super) fn watch_host(&self, stop: i32) {
        while let Some(c) = self.host_changes(stop) {
            if !c.is_empty() {
                self.supervisor.host_changed(&c);
            }
        }
    }

    pub(super) fn watches_host(&self) -> bool {
        self.watch.is_some()
    }

    /// Under a share quota: the file's size before a write or allocation
    /// that reaches `end`, or ENOSPC (reported) if its growth would not
    /// fit. None without a quota.
    fn grows(&self, ctx: &Context, inode: u64, handle: u64, end: u64) -> io::Result<Option<u64>> {
        let Some(q) = &self.quota else {
            return Ok(None);
        };
        let (st, _) = self.inner.getattr(ctx, inode, Some(handle))?;
        let before = st.st_size.max(0) as u64;
        if !q.fits(end.saturating_sub(before)) {
            let path = self
                .path_of(inode)
                .unwrap_or_else(|_| self.guest_root.clone());
            let refusal = Refusal {
                rule: RuleRef {
                    id: "share-quota".into(),
                    layer: "session".into(),
                    location: None,
                },
                reason: format!(
                    "the session's shares may grow by {} bytes in all, and {} are used",
                    q.limit(),
                    q.used()
                ),
            };
            self.supervisor.denied("write", &path, &refusal);
            return Err(err(libc::ENOSPC));
        }
        Ok(Some(before))
    }

    /// Counts what a write or allocation added, measured on the host.
    fn grew(&self, ctx: &Context, inode: u64, handle: u64, before: Option<u64>) {
        let (Some(q), Some(before)) = (&self.quota, before) else {
            return;
        };
        if let Ok((st, _)) = self.inner.getattr(ctx, inode, Some(handle)) {
            q.add((st.st_size.max(0) as u64).saturating_sub(before));
        }
    }

    fn created(&self, parent: u64, name: &CStr, path: &str, e: Entry) -> Entry {
        self.remember(parent, name.to_bytes(), e.inode, e.attr.st_mode);
        self.supervisor.changed(Change::Created, path);
        self.fit(e)
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
        self.nodes.forget(inode, count, self.watch.as_ref());
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
            self.supervisor.changed(Change::Written, &path);
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
        let rel = self.child_rel("symlink", parent, name)?;
        let path = self.guest_path(&rel);
        self.check("symlink", &path, FsAccess::Write)?;
        if leaves_share(&rel, linkname.to_bytes()) {
            let target = String::from_utf8_lossy(linkname.to_bytes());
            if let Some(refusal) = self.supervisor.leaving_link(&path, &target) {
                self.supervisor.denied("symlink", &path, &refusal);
                return Err(err(libc::EACCES));
            }
        }
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
        self.supervisor.changed(Change::Deleted, &path);
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let path = self.child("rmdir", parent, name)?;
        self.check("rmdir", &path, FsAccess::Write)?;
        let _echo = self.own(parent, name.to_bytes());
        self.inner.rmdir(ctx, parent, name)?;
        self.supervisor.changed(Change::Deleted, &path);
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
                    self.supervisor.denied("rename", &old, &refusal);
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
        self.nodes
            .moved(olddir, oldname.to_bytes(), newdir, newname.to_bytes());
        self.supervisor
            .changed(Change::Renamed, &format!("{old} -> {new}"));
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let path = self.child("link", newparent, newname)?;
        self.check("link", &path, FsAccess::Write)?;
        let mode = self.nodes.mode_of(inode).ok_or_else(|| err(libc::EBADF))?;
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
        let mode = self.nodes.mode_of(inode).unwrap_or(0);
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
            self.supervisor.changed(Change::Written, &path);
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
        let before = self.grows(ctx, inode, handle, offset.saturating_add(size.into()))?;
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
        self.grew(ctx, inode, handle, before);
        let first = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle);
        if first {
            if let Ok(path) = self.path_of(inode) {
                self.supervisor.changed(Change::Written, &path);
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
        let before = self.grows(ctx, inode, handle, offset.saturating_add(length))?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)?;
        self.grew(ctx, inode, handle, before);
        Ok(())
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
        let mode = self.nodes.mode_of(inode).unwrap_or(0);
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
