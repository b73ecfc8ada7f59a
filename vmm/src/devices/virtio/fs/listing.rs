//! Directory listings that read the host directory forward only.
//!
//! A listing request carries the offset of the last entry the guest was
//! given. The passthrough seeks the host directory there and reads a buffer
//! of entries, but not all of them fit the reply (a FUSE record is bigger
//! than the host's, a "plus" record much bigger), so the host directory
//! ends up past the guest's offset and the next request seeks it back.
//! tmpfs before Linux 6.6 counts a seek's offset in entries still present:
//! once the guest has deleted what it was given (`rm -r` deletes while it
//! lists), that seek lands too far and entries are never listed. So the
//! entries read but not sent wait here for the next request, which then
//! goes on from where the host directory stands, and the seek is a no-op.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Mutex;

use fuse_backend_rs::api::filesystem::DirEntry;

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

/// Where one open directory's listing stands, when the host directory is
/// not simply at the guest's offset.
struct Listing {
    inode: u64,
    /// The offset the guest's next request will carry.
    expect: u64,
    /// Where the host directory stands.
    resume: u64,
    pending: VecDeque<Pending>,
}

/// The listings of open directories, by handle.
#[derive(Default)]
pub(super) struct Listings(Mutex<HashMap<u64, Listing>>);

impl Listings {
    /// Serves one listing request of directory `inode`, open as `handle`,
    /// from the guest's `offset`. `read(from, each)` reads host entries
    /// from host offset `from`, calling `each` for every one; `offer` puts
    /// an entry into the reply.
    pub(super) fn serve(
        &self,
        handle: u64,
        inode: u64,
        offset: u64,
        read: impl FnOnce(u64, &mut dyn FnMut(DirEntry) -> io::Result<usize>) -> io::Result<()>,
        offer: &mut dyn FnMut(DirEntry) -> io::Result<Offer>,
    ) -> io::Result<()> {
        let held = self.lock().remove(&handle);
        // A listing goes on only where the guest left it: any other offset
        // (a rewind, a seek) starts afresh from there.
        let (mut from, mut pending) = match held {
            Some(l) if l.inode == inode && l.expect == offset => (l.resume, l.pending),
            _ => (offset, VecDeque::new()),
        };
        let mut given = offset;
        let mut full = false;
        while let Some(p) = pending.front() {
            match offer(p.entry())? {
                Offer::Full => {
                    full = true;
                    break;
                }
                Offer::Given => given = p.offset,
                Offer::Skipped => {}
            }
            pending.pop_front();
        }
        if !full {
            read(from, &mut |d: DirEntry| {
                if full {
                    pending.push_back(Pending::of(d));
                } else {
                    match offer(d)? {
                        Offer::Given => given = d.offset,
                        Offer::Skipped => {}
                        Offer::Full => {
                            full = true;
                            pending.push_back(Pending::of(d));
                        }
                    }
                }
                from = d.offset;
                // Never "full" to the reader: it would stop, and what it
                // read past this entry would be lost to the next seek.
                Ok(1)
            })?;
        }
        if !pending.is_empty() || from != given {
            self.lock().insert(
                handle,
                Listing {
                    inode,
                    expect: given,
                    resume: from,
                    pending,
                },
            );
        }
        Ok(())
    }

    /// The directory was closed.
    pub(super) fn close(&self, handle: u64) {
        self.lock().remove(&handle);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Listing>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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
            each: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
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
                if each(d)? == 0 {
                    break;
                }
            }
            Ok(())
        }

        fn delete(&mut self, gone: &[(Vec<u8>, u64)]) {
            self.names.retain(|n| !gone.iter().any(|(g, _)| *g == n.1));
        }
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
                    |from, each| dir.read(batch, from, each),
                    &mut |d| {
                        if got.len() == fits {
                            return Ok(Offer::Full);
                        }
                        got.push((d.name.to_vec(), d.offset));
                        Ok(Offer::Given)
                    },
                )
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
        assert_eq!(remove_all(&Listings::default(), &mut dir, 25, 128), 0);

        // What the passthrough alone does: seek to the guest's offset
        // each time. Half the entries are never listed.
        let mut dir = Tmpfs::new(1000);
        let mut offset = 0;
        loop {
            let mut got = Vec::new();
            dir.read(128, offset, &mut |d| {
                if got.len() == 25 {
                    return Ok(0);
                }
                got.push((d.name.to_vec(), d.offset));
                Ok(1)
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
        let listings = Listings::default();
        let mut dir = Tmpfs::new(10);
        let mut list = |offset: u64, fits: usize| {
            let mut got = Vec::new();
            listings
                .serve(
                    7,
                    2,
                    offset,
                    |from, each| dir.read(4, from, each),
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
                .unwrap();
            got
        };
        // f3 is read last in the first batch and left out: the next request
        // (from f2's offset) goes on after it.
        assert_eq!(list(0, 10), ["f0", "f1", "f2"]);
        assert_eq!(list(3, 2), ["f4", "f5"]);
        // f6 and f7 were read and wait.
        assert_eq!(list(6, 10), ["f6", "f7", "f8", "f9"]);
        assert!(list(10, 10).is_empty());
        // A rewind starts afresh; the two are the only seeks.
        assert_eq!(list(0, 1), ["f0"]);
        assert_eq!(list(0, 2), ["f0", "f1"]);
        assert_eq!(dir.seeks, 2);
        listings.close(7);
        assert!(listings.lock().is_empty());
    }
}
