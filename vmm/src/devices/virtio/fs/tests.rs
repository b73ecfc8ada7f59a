//! The guard, driven as a hostile driver would drive it: FUSE requests with
//! forged names and inodes, against a real host directory.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions, SetattrValid, ROOT_ID};

use super::*;

/// Denies `.env` files and everything under a `.ssh` directory (but not
/// the directory itself, to exercise the rename walk), and records all.
#[derive(Default)]
struct Recorder {
    denied: Mutex<Vec<(String, String)>>,
    /// The rule each refusal named, in order.
    rules: Mutex<Vec<RuleRef>>,
    /// Links that leave the share, as `path -> target`.
    leaving: Mutex<Vec<String>>,
    changed: Mutex<Vec<(Change, String)>>,
}

fn rule(id: &str, layer: &str, location: &str) -> RuleRef {
    RuleRef {
        id: id.into(),
        layer: layer.into(),
        location: Some(location.into()),
    }
}

impl FsSupervisor for Recorder {
    fn check(&self, path: &str, _access: FsAccess) -> Option<Refusal> {
        (path.ends_with("/.env") || path.contains("/.ssh/")).then(|| Refusal {
            rule: rule("secrets", "team", "policy.toml:7"),
            reason: "secret".into(),
        })
    }
    fn denied(&self, op: &str, path: &str, refusal: &Refusal) {
        self.denied.lock().unwrap().push((op.into(), path.into()));
        self.rules.lock().unwrap().push(refusal.rule.clone());
    }
    fn changed(&self, change: Change, path: &str) {
        self.changed.lock().unwrap().push((change, path.into()));
    }
    /// Links leaving the share are recorded; named `refused-*`, refused.
    fn leaving_link(&self, path: &str, target: &str) -> Option<Refusal> {
        self.leaving
            .lock()
            .unwrap()
            .push(format!("{path} -> {target}"));
        path.contains("/refused-").then(|| Refusal {
            rule: rule("no-leaving-links", "org", "org.toml:4"),
            reason: "leaves".into(),
        })
    }
}

struct Fixture {
    root: PathBuf,
    fs: Guard,
    rec: Arc<Recorder>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.root.parent().unwrap());
    }
}

fn fixture(read_only: bool) -> Fixture {
    fixture_cached(read_only, FsCache::Never)
}

fn fixture_cached(read_only: bool, cache: FsCache) -> Fixture {
    fixture_sharing(read_only, cache, WatchBudget::new(1000))
}

fn fixture_quota(quota: Arc<ShareQuota>) -> Fixture {
    fixture_with(false, FsCache::Never, WatchBudget::new(1000), Some(quota))
}

fn fixture_sharing(read_only: bool, cache: FsCache, watches: Arc<WatchBudget>) -> Fixture {
    fixture_with(read_only, cache, watches, None)
}

/// A share whose watches (and bytes, under a quota) come from budgets it
/// shares with the session's others.
fn fixture_with(
    read_only: bool,
    cache: FsCache,
    watches: Arc<WatchBudget>,
    quota: Option<Arc<ShareQuota>>,
) -> Fixture {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::env::temp_dir().join(format!(
        "sbx-fs-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let root = base.join("mount");
    std::fs::create_dir_all(root.join("dir/.ssh")).unwrap();
    std::fs::write(base.join("outside"), "host secret").unwrap();
    std::fs::write(root.join("file"), "hello").unwrap();
    std::fs::write(root.join(".env"), "TOKEN=1").unwrap();
    std::fs::write(root.join("dir/.ssh/id"), "key").unwrap();
    std::os::unix::fs::symlink(base.join("outside"), root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("rel-link")).unwrap();
    let fifo = CString::new(root.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let rec = Arc::new(Recorder::default());
    let fs = file_system(&FsConfig {
        tag: "t".into(),
        host_dir: root.clone(),
        guest_path: "/workspace".into(),
        read_only,
        mount_rule: rule("m", "project", ".sbx/policy.toml:2"),
        cache,
        supervisor: rec.clone(),
        watches,
        quota,
    })
    .unwrap();
    Fixture { root, fs, rec }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn code<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn ctx() -> Context {
    Context {
        uid: 1000,
        gid: 1000,
        pid: 1,
    }
}

fn create_in(mode: u32) -> CreateIn {
    CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | mode,
        umask: 0,
        fuse_flags: 0,
    }
}

#[test]
fn names_never_leave_the_directory() {
    let f = fixture(false);
    for name in ["..", ".", "", "a/b", "../outside"] {
        assert_eq!(
            code(f.fs.lookup(&ctx(), ROOT_ID, &c(name))),
            libc::EINVAL,
            "{name}"
        );
    }
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    assert_eq!(code(f.fs.lookup(&ctx(), dir.inode, &c(".."))), libc::EINVAL);
    // Symlinks are entries of their own: the host never follows them, and
    // the guest only gets their text back.
    for link in ["abs-link", "rel-link"] {
        let e = f.fs.lookup(&ctx(), ROOT_ID, &c(link)).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            code(f.fs.open(&ctx(), e.inode, libc::O_RDONLY as u32, 0)),
            libc::EACCES
        );
        assert!(!f.fs.readlink(&ctx(), e.inode).unwrap().is_empty());
    }
    // A forged inode number reaches nothing.
    assert_eq!(code(f.fs.open(&ctx(), 999_999, 0, 0)), libc::EBADF);
    assert_eq!(
        code(f.fs.link(&ctx(), 999_999, ROOT_ID, &c("stolen"))),
        libc::EBADF
    );
    assert!(!f.root.join("stolen").exists());
    assert!(f.rec.denied.lock().unwrap().len() >= 6);
}

#[test]
fn special_files_are_neither_made_nor_opened() {
    let f = fixture(false);
    for mode in [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFIFO, libc::S_IFSOCK] {
        let r =
            f.fs.mknod(&ctx(), ROOT_ID, &c("node"), mode | 0o666, 0x0101, 0);
        assert_eq!(code(r), libc::EPERM);
    }
    assert!(!f.root.join("node").exists());
    // A FIFO the host put there is listed, but never opened (which would
    // block the device).
    let fifo = f.fs.lookup(&ctx(), ROOT_ID, &c("fifo")).unwrap();
    assert_eq!(
        code(f.fs.open(&ctx(), fifo.inode, libc::O_RDONLY as u32, 0)),
        libc::EACCES
    );
    // No setuid: stripped on create, refused on chmod.
    let (e, ..) =
        f.fs.create(&ctx(), ROOT_ID, &c("suid"), create_in(0o4755))
            .unwrap();
    let mode = std::fs::metadata(f.root.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    let mut attr = e.attr;
    attr.st_mode = libc::S_IFREG | 0o4755;
    assert_eq!(
        code(f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE)),
        libc::EPERM
    );
    // Ownership stays the host user's, whatever uid the guest claims.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(f.root.join("suid")).unwrap();
    // SAFETY: getuid has no failure mode.
    assert_eq!(md.uid(), unsafe { libc::getuid() });
}

#[test]
fn deny_rules_hide_and_refuse() {
    let f = fixture(false);
    assert_eq!(code(f.fs.lookup(&ctx(), ROOT_ID, &c(".env"))), libc::EACCES);
    assert_eq!(
        code(f.fs.create(&ctx(), ROOT_ID, &c(".env"), create_in(0o644))),
        libc::EACCES
    );
    // Listings leave it out.
    let (h, _) = f.fs.opendir(&ctx(), ROOT_ID, 0).unwrap();
    let mut names = Vec::new();
    f.fs.readdir(&ctx(), ROOT_ID, h.unwrap_or(0), 4096, 0, &mut |d| {
        names.push(String::from_utf8_lossy(d.name).into_owned());
        Ok(1)
    })
    .unwrap();
    assert!(names.contains(&"file".to_string()), "{names:?}");
    assert!(!names.contains(&".env".to_string()), "{names:?}");
    // Renaming a directory that holds a denied file would move the file
    // out from under its rule.
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    let r =
        f.fs.rename(&ctx(), dir.inode, &c(".ssh"), ROOT_ID, &c("plain"), 0);
    assert_eq!(code(r), libc::EACCES);
    assert!(f.root.join("dir/.ssh/id").exists());
    let denied = f.rec.denied.lock().unwrap();
    assert!(
        denied
            .iter()
            .any(|(op, p)| op == "rename" && p == "/workspace/dir/.ssh"),
        "{denied:?}"
    );
}

#[test]
fn refusals_name_the_whole_rule() {
    let f = fixture(true);
    let e = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
    let _ = f.fs.lookup(&ctx(), ROOT_ID, &c(".env"));
    let _ = f.fs.open(&ctx(), e.inode, libc::O_WRONLY as u32, 0);
    let _ = f.fs.lookup(&ctx(), ROOT_ID, &c(".."));
    assert_eq!(
        *f.rec.rules.lock().unwrap(),
        [
            rule("secrets", "team", "policy.toml:7"),
            rule("m", "project", ".sbx/policy.toml:2"),
            RuleRef::guard(),
        ]
    );
}

/// The guest resolves symlinks in its own tree, but host tools follow them
/// on the host: a link out of the share is told to the supervisor, which
/// may refuse it.
#[test]
fn symlinks_that_leave_the_share_are_reported_and_may_be_refused() {
    let f = fixture(false);
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    f.fs.symlink(&ctx(), &c("file"), ROOT_ID, &c("inside"))
        .unwrap();
    f.fs.symlink(&ctx(), &c("../file"), dir.inode, &c("up"))
        .unwrap();
    f.fs.symlink(&ctx(), &c("/etc/passwd"), ROOT_ID, &c("abs"))
        .unwrap();
    f.fs.symlink(&ctx(), &c("../../x"), dir.inode, &c("out"))
        .unwrap();
    assert_eq!(
        *f.rec.leaving.lock().unwrap(),
        [
            "/workspace/abs -> /etc/passwd",
            "/workspace/dir/out -> ../../x"
        ]
    );
    assert_eq!(
        code(f.fs.symlink(&ctx(), &c("/etc"), ROOT_ID, &c("refused-link"))),
        libc::EACCES
    );
    assert!(!f.root.join("refused-link").exists());
    assert_eq!(
        f.rec.rules.lock().unwrap().last().map(|r| r.id.as_str()),
        Some("no-leaving-links")
    );
}

#[test]
fn read_only_mounts_refuse_every_write() {
    let f = fixture(true);
    let e = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
    assert_eq!(
        code(f.fs.open(&ctx(), e.inode, libc::O_WRONLY as u32, 0)),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.open(&ctx(), e.inode, (libc::O_RDONLY | libc::O_TRUNC) as u32, 0)),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.create(&ctx(), ROOT_ID, &c("new"), create_in(0o644))),
        libc::EROFS
    );
    assert_eq!(code(f.fs.unlink(&ctx(), ROOT_ID, &c("file"))), libc::EROFS);
    assert_eq!(
        code(f.fs.mkdir(&ctx(), ROOT_ID, &c("d"), 0o755, 0)),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.rename(&ctx(), ROOT_ID, &c("file"), ROOT_ID, &c("f2"), 0)),
        libc::EROFS
    );
    assert_eq!(
        code(f.fs.symlink(&ctx(), &c("x"), ROOT_ID, &c("l"))),
        libc::EROFS
    );
    let mut attr = e.attr;
    attr.st_size = 0;
    assert_eq!(
        code(f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::SIZE)),
        libc::EROFS
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("file")).unwrap(),
        "hello"
    );
    // Reading is fine.
    assert_eq!(
        code(f.fs.open(&ctx(), e.inode, libc::O_RDONLY as u32, 0)),
        0
    );
    assert!(f.rec.denied.lock().unwrap().len() >= 8);
}

#[test]
fn changes_are_reported() {
    let f = fixture(false);
    let (e, ..) =
        f.fs.create(&ctx(), ROOT_ID, &c("a"), create_in(0o644))
            .unwrap();
    f.fs.rename(&ctx(), ROOT_ID, &c("a"), ROOT_ID, &c("b"), 0)
        .unwrap();
    // The guest's inode follows the rename: its path is the new one.
    assert_eq!(f.fs.path_of(e.inode).unwrap(), "/workspace/b");
    f.fs.unlink(&ctx(), ROOT_ID, &c("b")).unwrap();
    let changed = f.rec.changed.lock().unwrap();
    assert_eq!(
        *changed,
        vec![
            (Change::Created, "/workspace/a".to_string()),
            (Change::Renamed, "/workspace/a -> /workspace/b".to_string()),
            (Change::Deleted, "/workspace/b".to_string()),
        ]
    );
}

#[test]
fn requests_are_few_and_large() {
    let f = fixture(false);
    let opts = f.fs.init(FsOptions::all()).unwrap();
    for wanted in [
        FsOptions::BIG_WRITES,
        FsOptions::MAX_PAGES,
        FsOptions::ATOMIC_O_TRUNC,
        FsOptions::AUTO_INVAL_DATA,
    ] {
        assert!(opts.contains(wanted), "{wanted:?} is not asked for");
    }
    for refused in [
        FsOptions::ZERO_MESSAGE_OPEN,
        FsOptions::ZERO_MESSAGE_OPENDIR,
        FsOptions::PERFILE_DAX,
        FsOptions::WRITEBACK_CACHE,
    ] {
        assert!(!opts.contains(refused), "{refused:?} is asked for");
    }
    // Only what the guest kernel offers is asked for.
    let old = f.fs.init(FsOptions::ASYNC_READ).unwrap();
    assert!(!old.intersects(FsOptions::MAX_PAGES | FsOptions::ATOMIC_O_TRUNC));

    // FLUSH is declined for good, and a truncating open is a write.
    let e = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
    let flags = (libc::O_WRONLY | libc::O_TRUNC) as u32;
    let (h, ..) = f.fs.open(&ctx(), e.inode, flags, 0).unwrap();
    assert_eq!(
        code(f.fs.flush(&ctx(), e.inode, h.unwrap(), 0)),
        libc::ENOSYS
    );
    assert_eq!(std::fs::metadata(f.root.join("file")).unwrap().len(), 0);
    assert_eq!(
        *f.rec.changed.lock().unwrap(),
        vec![(Change::Written, "/workspace/file".to_string())]
    );
}

#[test]
fn missing_names_are_cached_only_when_names_are() {
    let f = fixture(false);
    assert_eq!(code(f.fs.lookup(&ctx(), ROOT_ID, &c("nope"))), libc::ENOENT);
    let f = fixture_cached(false, FsCache::Auto);
    let e = f.fs.lookup(&ctx(), ROOT_ID, &c("nope")).unwrap();
    assert_eq!((e.inode, e.entry_timeout), (0, Duration::from_secs(60)));
    // Refusals are never turned into cached absences.
    assert_eq!(code(f.fs.lookup(&ctx(), ROOT_ID, &c(".env"))), libc::EACCES);
    assert_eq!(code(f.fs.lookup(&ctx(), ROOT_ID, &c(".."))), libc::EINVAL);
}

/// Host edits in directories the guest knows are reported by guest path;
/// the guest's own changes, names the policy hides and directories the
/// guest never saw are not.
#[test]
fn host_edits_are_reported_and_the_guests_own_are_not() {
    let f = fixture_cached(false, FsCache::Auto);
    assert!(f.fs.watches_host());
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    assert_eq!(dir.entry_timeout, Duration::from_secs(60));
    let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let stop = std::os::fd::AsRawFd::as_raw_fd(&stop);

    // The guest's own changes, through the device.
    f.fs.create(&ctx(), dir.inode, &c("mine"), create_in(0o644))
        .unwrap();
    f.fs.unlink(&ctx(), ROOT_ID, &c("file")).unwrap();
    // The host's edits.
    std::fs::write(f.root.join("dir/theirs"), "x").unwrap();
    std::fs::write(f.root.join(".env"), "TOKEN=2").unwrap();
    std::fs::create_dir(f.root.join("unseen")).unwrap();
    std::fs::write(f.root.join("unseen/deep"), "x").unwrap();
    std::fs::rename(f.root.join("dir/theirs"), f.root.join("dir/moved")).unwrap();

    let got = f.fs.host_changes(stop).unwrap();
    assert_eq!(
        got.paths,
        [
            "/workspace/dir/moved",
            "/workspace/dir/theirs",
            "/workspace/unseen"
        ],
        "{got:?}"
    );
    assert!(got.trees.is_empty());

    // Without `auto` nothing is watched.
    assert!(!fixture_cached(false, FsCache::Always).fs.watches_host());
    assert!(!fixture(false).fs.watches_host());
}

/// A host edit right after the guest's own change of the same name (a
/// formatter run on save, a build writing back) is no echo: the host entry
/// is no longer as the guest left it.
#[test]
fn a_host_edit_right_after_the_guests_own_is_reported() {
    let f = fixture_cached(false, FsCache::Auto);
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let stop = std::os::fd::AsRawFd::as_raw_fd(&stop);

    f.fs.create(&ctx(), dir.inode, &c("saved"), create_in(0o644))
        .unwrap();
    std::fs::write(f.root.join("dir/saved"), "formatted").unwrap();
    f.fs.unlink(&ctx(), ROOT_ID, &c("file")).unwrap();
    std::fs::write(f.root.join("file"), "back").unwrap();
    // Left as the guest made it: still the guest's own.
    f.fs.mkdir(&ctx(), dir.inode, &c("quiet"), 0o755, 0)
        .unwrap();
    // Plainly the host's, so that a batch comes whatever the rest does.
    std::fs::write(f.root.join("dir/theirs"), "x").unwrap();

    let got = f.fs.host_changes(stop).unwrap();
    assert_eq!(
        got.paths,
        [
            "/workspace/dir/saved",
            "/workspace/dir/theirs",
            "/workspace/file"
        ],
        "{got:?}"
    );
}

/// Once a directory cannot be watched, `auto` promises a second, not a
/// minute: the guest would otherwise miss host edits in it.
#[test]
fn an_unwatched_directory_shortens_the_promise() {
    // The root's watch is the one there is room for.
    let f = fixture_sharing(false, FsCache::Auto, WatchBudget::new(1));
    let e = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
    assert_eq!(e.entry_timeout, Duration::from_secs(60));
    let dir = f.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    assert_eq!(dir.entry_timeout, Duration::from_secs(1));
    assert_eq!(dir.attr_timeout, Duration::from_secs(1));
    let (_, attr_timeout) = f.fs.getattr(&ctx(), e.inode, None).unwrap();
    assert_eq!(attr_timeout, Duration::from_secs(1));
}

/// A session's shares draw on one budget of watches: one share walking a
/// big tree leaves none for the others, never more than the budget in all,
/// and what a share forgets (or a share that goes) gives its watches back.
#[test]
fn the_shares_of_a_session_share_one_watch_budget() {
    let budget = WatchBudget::new(3);
    let a = fixture_sharing(false, FsCache::Auto, budget.clone());
    let b = fixture_sharing(false, FsCache::Auto, budget.clone());
    assert_eq!(budget.left(), 1, "each root takes one");
    let in_a = a.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    assert_eq!(in_a.entry_timeout, Duration::from_secs(60));
    assert_eq!(budget.left(), 0);
    // None left for b: b promises a second, not a minute.
    let in_b = b.fs.lookup(&ctx(), ROOT_ID, &c("dir")).unwrap();
    assert_eq!(in_b.entry_timeout, Duration::from_secs(1));
    // a forgets its directory: the watch goes back.
    a.fs.forget(&ctx(), in_a.inode, 1);
    assert_eq!(budget.left(), 1);
    drop(a);
    assert_eq!(budget.left(), 2, "a's root came back with a");
    drop(b);
    assert_eq!(budget.left(), 3);
}

/// A session's shares grow by at most their quota, in all: growth past a
/// file's end is counted, rewriting within it is not, and what would pass
/// the quota fails with ENOSPC, naming it.
#[test]
fn shares_grow_within_their_quota() {
    let quota = ShareQuota::new(1000);
    let a = fixture_quota(quota.clone());
    let b = fixture_quota(quota.clone());
    let e = a.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
    let (h, ..) = a.fs.open(&ctx(), e.inode, libc::O_RDWR as u32, 0).unwrap();
    let h = h.unwrap();
    // "hello" is 5 bytes: growing it to 600 adds 595.
    a.fs.fallocate(&ctx(), e.inode, h, 0, 0, 600).unwrap();
    assert_eq!(quota.used(), 595);
    // Within the file's end: nothing added.
    a.fs.fallocate(&ctx(), e.inode, h, 0, 100, 400).unwrap();
    assert_eq!(quota.used(), 595);
    // The other share draws on the same quota.
    let (entry, h2, ..) =
        b.fs.create(&ctx(), ROOT_ID, &c("new"), create_in(0o644))
            .unwrap();
    let h2 = h2.unwrap();
    b.fs.fallocate(&ctx(), entry.inode, h2, 0, 0, 400).unwrap();
    assert_eq!(quota.used(), 995);
    assert_eq!(
        code(a.fs.fallocate(&ctx(), e.inode, h, 0, 0, 2000)),
        libc::ENOSPC
    );
    assert_eq!(std::fs::metadata(a.root.join("file")).unwrap().len(), 600);
    assert_eq!(
        a.rec.rules.lock().unwrap().last().map(|r| r.id.as_str()),
        Some("share-quota")
    );
}

/// A plus listing read in page-sized replies, as the guest kernel asks for
/// it: more host entries are read per request than fit, and the rest come
/// in the next reply, each once, looked up, with denied names left out.
#[test]
fn plus_listings_give_every_entry_once() {
    let f = fixture(false);
    std::fs::create_dir(f.root.join("many")).unwrap();
    for i in 0..300 {
        std::fs::write(f.root.join(format!("many/f{i}")), "x").unwrap();
    }
    std::fs::write(f.root.join("many/.env"), "TOKEN=1").unwrap();
    let many = f.fs.lookup(&ctx(), ROOT_ID, &c("many")).unwrap().inode;
    let (h, _) = f.fs.opendir(&ctx(), many, 0).unwrap();
    let h = h.unwrap_or(0);
    let (mut names, mut offset, mut replies) = (Vec::new(), 0, 0);
    loop {
        let (mut room, before) = (4096usize, names.len());
        f.fs.readdirplus(&ctx(), many, h, 4096, offset, &mut |d, e| {
            // A FUSE plus record: entry, attributes, dirent, padded name.
            let len = 152 + d.name.len().div_ceil(8) * 8;
            if len > room {
                return Ok(0);
            }
            room -= len;
            assert_eq!(e.attr.st_size, 1, "{:?}", String::from_utf8_lossy(d.name));
            names.push(String::from_utf8_lossy(d.name).into_owned());
            offset = d.offset;
            Ok(len)
        })
        .unwrap();
        if names.len() == before {
            break;
        }
        replies += 1;
    }
    f.fs.releasedir(&ctx(), many, 0, h).unwrap();
    assert!(replies > 10, "{replies} replies");

    // A plain listing reads names only: no host lookups, and each entry
    // carries the inode number the guest's stat will show.
    use std::os::unix::fs::MetadataExt;
    let (h, _) = f.fs.opendir(&ctx(), many, 0).unwrap();
    let mut inos = HashMap::new();
    f.fs.readdir(&ctx(), many, h.unwrap_or(0), 4096, 0, &mut |d| {
        inos.insert(String::from_utf8_lossy(d.name).into_owned(), d.ino);
        Ok(1)
    })
    .unwrap();
    let host = std::fs::metadata(f.root.join("many/f7")).unwrap().ino();
    assert_eq!(inos.get("f7"), Some(&host), "{inos:?}");
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "listed twice: {names:?}");
    assert_eq!(names.len(), 300, "{names:?}");
    assert!(!names.contains(&".env".to_string()));
}
