//! Directory listings, read from a descriptor of our own.
//!
//! fuse-backend-rs's passthrough lists a directory by looking up every
//! entry it reads (an open, a stat and a close on the host, even for a
//! plain listing that needs none of it) and by seeking the directory to
//! the guest's offset on every request. Not all entries read fit the reply
//! (a FUSE record is bigger than the host's, a "plus" record much bigger),
//! so that seek goes back, and tmpfs before Linux 6.6 counts a seek's
//! offset in entries still present: once the guest has deleted what it was
//! given (`rm -r` deletes while it lists) the seek lands too far and
//! entries are never listed. Here a directory the guest opens gets a
//! descriptor of ours; entries read but not sent wait for the next
//! request, which goes on from where the host directory stands; and only
//! the entries of a plus reply are looked up.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use fuse_backend_rs::api::filesystem::{Context, DirEntry, FileSystem};
use std::os::unix::fs::MetadataExt;

use super::beneath;
use super::guard::Guard;

/// Host entries read per request at most: the guest kernel asks for a page
/// at a time, and what does not fit waits in memory per open directory.
pub(super) const READ_MAX: u32 = 32 * 1024;

/// What became of an entry offered to a reply.
pub(super) enum Offer {
    Given,
    /// Left out of the listing (denied, or gone since it was read).
    Skipped,
    /// The reply is full; the entry waits for the next request.
    Full,
}

/// A host entry read but not yet offered.
struct Pending {
    ino: u64,
    offset: u64,
    type_: u32,
    name: Vec<u8>,
}

impl Pending {
    fn of(d: DirEntry) -> Self {
        Pending {
            ino: d.ino,
            offset: d.offset,
            type_: d.type_,
            name: d.name.to_vec(),
        }
    }

    fn entry(&self) -> DirEntry<'_> {
        DirEntry {
            ino: self.ino,
            offset: self.offset,
            type_: self.type_,
            name: &self.name,
        }
    }
}

/// Where one open directory's listing stands.
struct Listing {
    inode: u64,
    dir: File,
    /// The offset the guest's next request will carry.
    expect: u64,
    /// Where the host directory stands (past `pending`).
    resume: u64,
    pending: VecDeque<Pending>,
}

impl Listing {
    fn serve(
        &mut self,
        offset: u64,
        mut read: impl FnMut(&File, u64, &mut dyn FnMut(DirEntry) -> io::Result<()>) -> io::Result<()>,
        offer: &mut dyn FnMut(DirEntry) -> io::Result<Offer>,
    ) -> io::Result<()> {
        // A listing goes on only where the guest left it: any other offset
        // (a rewind, a seek) starts afresh from there.
        if self.expect != offset {
            self.pending.clear();
            self.resume = offset;
        }
        let mut given = offset;
        let mut full = false;
        while let Some(p) = self.pending.front() {
            match offer(p.entry())? {
                Offer::Full => {
                    full = true;
                    break;
                }
                Offer::Given => given = p.offset,
                Offer::Skipped => {}
            }
            self.pending.pop_front();
        }
        // Read on until the reply is full or the directory ends: a read is
        // a syscall, a reply the guest must come back for is a request.
        while !full {
            let before = self.resume;
            let (pending, resume) = (&mut self.pending, &mut self.resume);
            read(&self.dir, before, &mut |d: DirEntry| {
                *resume = d.offset;
                if d.name == b"." || d.name == b".." {
                    return Ok(());
                }
                if full {
                    pending.push_back(Pending::of(d));
                    return Ok(());
                }
                match offer(d)? {
                    Offer::Given => given = d.offset,
                    Offer::Skipped => {}
                    Offer::Full => {
                        full = true;
                        pending.push_back(Pending::of(d));
                    }
                }
                Ok(())
            })?;
            if self.resume == before {
                break;
            }
        }
        self.expect = given;
        Ok(())
    }
}

/// The listings of open directories, by handle.
#[derive(Default)]
pub(super) struct Listings(Mutex<HashMap<u64, Listing>>);

impl Listings {
    /// Lists directory `inode`, open as `handle`, from `dir` (a descriptor
    /// of that directory, open for reading).
    pub(super) fn open(&self, handle: u64, inode: u64, dir: File) {
        let l = Listing {
            inode,
            dir,
            expect: 0,
            resume: 0,
            pending: VecDeque::new(),
        };
        self.lock().insert(handle, l);
    }

    /// Serves one listing request of directory `inode`, open as `handle`,
    /// from the guest's `offset`; `None` when the directory was not opened
    /// here. `read(dir, from, each)` reads host entries from host offset
    /// `from`, calling `each` for every one, and reads nothing at the end;
    /// `offer` puts an entry into the reply.
    pub(super) fn serve(
        &self,
        handle: u64,
        inode: u64,
        offset: u64,
        read: impl FnMut(&File, u64, &mut dyn FnMut(DirEntry) -> io::Result<()>) -> io::Result<()>,
        offer: &mut dyn FnMut(DirEntry) -> io::Result<Offer>,
    ) -> Option<io::Result<()>> {
        // Out of the map while it is served, so no lock is held over I/O.
        let mut l = self.lock().remove(&handle)?;
        let res = (l.inode == inode).then(|| l.serve(offset, read, offer));
        if res.as_ref().is_some_and(|r| r.is_err()) {
            // The reply is lost and where the host directory stands is not
            // known: the next request starts afresh from its offset.
            l.expect = u64::MAX;
        }
        self.lock().insert(handle, l);
        res
    }

    /// The directory was closed.
    pub(super) fn close(&self, handle: u64) {
        self.lock().remove(&handle);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Listing>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `struct linux_dirent64` up to its name: inode, offset, record length,
/// type.
const DIRENT_HEAD: usize = 19;

/// Reads entries of `dir` from host offset `from`, `size` bytes of them
/// at most. The seek is a no-op when the directory is already there,
/// which is where [`Listings::serve`] goes on from.
pub(super) fn read_dir(
    dir: &File,
    from: u64,
    size: u32,
    each: &mut dyn FnMut(DirEntry) -> io::Result<()>,
) -> io::Result<()> {
    let fd = dir.as_raw_fd();
    // SAFETY: a plain syscall on a descriptor we own.
    if unsafe { libc::lseek64(fd, from as libc::off64_t, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &buf[..n as usize];
    while rest.len() >= DIRENT_HEAD {
        let len = usize::from(u16::from_ne_bytes([rest[16], rest[17]]));
        if len < DIRENT_HEAD || len > rest.len() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let name = &rest[DIRENT_HEAD..len];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&rest[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        each(DirEntry {
            ino: word(0),
            offset: word(8),
            type_: u32::from(rest[18]),
            name,
        })?;
        rest = &rest[len..];
    }
    Ok(())
}

impl Guard {
    /// One listing request, plain or plus, from the directory's own
    /// descriptor ([`Listings`]); `None` when it has none, and the
    /// passthrough lists it. `give` puts an entry that the policy lets the
    /// guest see into the reply.
    pub(super) fn list(
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
            read_dir(d, from, count, each)
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
    pub(super) fn own_dir(&self, ctx: &Context, inode: u64) -> Option<File> {
        let root = self.root.as_ref()?;
        let rel = self.nodes.rel(inode).ok()?;
        let rel = if rel.is_empty() { b".".to_vec() } else { rel };
        let fd = beneath::open_beneath(root, &rel, libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
        let dir = File::from(fd);
        let ours = dir.metadata().ok()?;
        let (theirs, _) = self.inner.getattr(ctx, inode, None).ok()?;
        (ours.dev() == theirs.st_dev && ours.ino() == theirs.st_ino).then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with tmpfs's offsets before Linux 6.6. A read goes on
    /// from where the last one stopped, however many entries were deleted
    /// since; only a seek elsewhere counts, and it counts offset `n` as the
    /// first `n` entries present now.
    struct Tmpfs {
        /// Entries in directory order, with ids that never change.
        names: Vec<(usize, Vec<u8>)>,
        pos: u64,
        /// The id of the next entry to read.
        next: usize,
        seeks: usize,
    }

    impl Tmpfs {
        fn new(n: usize) -> Self {
            Tmpfs {
                names: (0..n).map(|i| (i, format!("f{i}").into_bytes())).collect(),
                pos: 0,
                next: 0,
                seeks: 0,
            }
        }

        /// Seeks to `from` and reads up to `batch` entries, as the
        /// passthrough's lseek and getdents do.
        fn read(
            &mut self,
            batch: usize,
            from: u64,
            each: &mut dyn FnMut(DirEntry) -> io::Result<()>,
        ) -> io::Result<()> {
            if from != self.pos {
                self.next = self.names.get(from as usize).map_or(usize::MAX, |n| n.0);
                self.pos = from;
                self.seeks += 1;
            }
            let unread: Vec<_> = self
                .names
                .iter()
                .filter(|n| n.0 >= self.next)
                .take(batch)
                .cloned()
                .collect();
            // getdents moves the directory past the whole batch, however
            // much of it the caller then uses.
            let start = self.pos;
            self.pos += unread.len() as u64;
            if let Some(last) = unread.last() {
                self.next = last.0 + 1;
            }
            for (i, (_, name)) in unread.iter().enumerate() {
                let d = DirEntry {
                    ino: 1,
                    offset: start + i as u64 + 1,
                    type_: libc::DT_REG as u32,
                    name,
                };
                each(d)?;
            }
            Ok(())
        }

        fn delete(&mut self, gone: &[(Vec<u8>, u64)]) {
            self.names.retain(|n| !gone.iter().any(|(g, _)| *g == n.1));
        }
    }

    /// Handle 7 of directory 2, read through a fake.
    fn opened() -> Listings {
        let l = Listings::default();
        l.open(7, 2, File::open(std::env::temp_dir()).unwrap());
        l
    }

    /// Lists like `rm -r`: takes `fits` entries a request, then deletes
    /// them before asking for more. Returns what was never listed.
    fn remove_all(listings: &Listings, dir: &mut Tmpfs, fits: usize, batch: usize) -> usize {
        let mut offset = 0;
        loop {
            let mut got = Vec::new();
            listings
                .serve(
                    7,
                    2,
                    offset,
                    |_, from, each| dir.read(batch, from, each),
                    &mut |d| {
                        if got.len() == fits {
                            return Ok(Offer::Full);
                        }
                        got.push((d.name.to_vec(), d.offset));
                        Ok(Offer::Given)
                    },
                )
                .unwrap()
                .unwrap();
            let Some(&(_, last)) = got.last() else {
                return dir.names.len();
            };
            offset = last;
            dir.delete(&got);
        }
    }

    #[test]
    fn deleting_while_listing_a_tmpfs_directory_lists_every_entry() {
        let mut dir = Tmpfs::new(1000);
        // More read than fits, as with real FUSE records.
        assert_eq!(remove_all(&opened(), &mut dir, 25, 128), 0);

        // What the passthrough alone does: seek to the guest's offset
        // each time. Half the entries are never listed.
        let mut dir = Tmpfs::new(1000);
        let mut offset = 0;
        loop {
            let mut got = Vec::new();
            dir.read(128, offset, &mut |d| {
                if got.len() < 25 {
                    got.push((d.name.to_vec(), d.offset));
                }
                Ok(())
            })
            .unwrap();
            let Some(&(_, last)) = got.last() else { break };
            offset = last;
            dir.delete(&got);
        }
        assert!(dir.names.len() >= 400, "{} left", dir.names.len());
    }

    #[test]
    fn skipped_entries_and_rewinds_keep_the_listing_whole() {
        let listings = opened();
        let mut dir = Tmpfs::new(10);
        let mut list = |offset: u64, fits: usize| {
            let mut got = Vec::new();
            listings
                .serve(
                    7,
                    2,
                    offset,
                    |_, from, each| dir.read(4, from, each),
                    &mut |d| {
                        if d.name == b"f3" {
                            return Ok(Offer::Skipped);
                        }
                        if got.len() == fits {
                            return Ok(Offer::Full);
                        }
                        got.push(String::from_utf8(d.name.to_vec()).unwrap());
                        Ok(Offer::Given)
                    },
                )
                .unwrap()
                .unwrap();
            got
        };
        // f3, the last of the first read, is left out; the reply fills up
        // in the second read, whose rest waits.
        assert_eq!(list(0, 4), ["f0", "f1", "f2", "f4"]);
        assert_eq!(list(5, 2), ["f5", "f6"]);
        assert_eq!(list(7, 10), ["f7", "f8", "f9"]);
        assert!(list(10, 10).is_empty());
        // A rewind starts afresh; the two are the only seeks.
        assert_eq!(list(0, 1), ["f0"]);
        assert_eq!(list(0, 2), ["f0", "f1"]);
        assert_eq!(dir.seeks, 2);
        listings.close(7);
        assert!(listings
            .serve(7, 2, 0, |_, _, _| Ok(()), &mut |_| Ok(Offer::Given))
            .is_none());
    }
}
