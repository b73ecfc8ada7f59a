//! The inodes the guest was given: where each was last seen (its parent
//! and name, so its guest path can be rebuilt for the policy), its file
//! type, how many lookups it holds (FUSE's reference count), and, under
//! `auto`, the inotify watch on it.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use fuse_backend_rs::api::filesystem::ROOT_ID;

use super::checks::err;
use super::host_watch::HostWatch;

struct Node {
    parent: u64,
    name: Vec<u8>,
    mode: u32,
    lookups: u64,
    /// The inotify watch on a directory, under `auto`.
    watch: Option<i32>,
}

pub(super) struct Nodes(Mutex<HashMap<u64, Node>>);

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

impl Nodes {
    /// The table with the root alone (watched as `root_watch`).
    pub(super) fn new(root_watch: Option<i32>) -> Nodes {
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
        Nodes(Mutex::new(nodes))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Node>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The path of `inode` inside the mount (`a/b`, empty for the root).
    pub(super) fn rel(&self, inode: u64) -> io::Result<Vec<u8>> {
        rel_in(&self.lock(), inode)
    }

    /// The file type bits of an inode the guest was given.
    pub(super) fn mode_of(&self, inode: u64) -> Option<u32> {
        self.lock().get(&inode).map(|n| n.mode)
    }

    /// The directory and name the guest knows `inode` by.
    pub(super) fn name_of(&self, inode: u64) -> Option<(u64, Vec<u8>)> {
        self.lock().get(&inode).map(|n| (n.parent, n.name.clone()))
    }

    /// The guest was given `inode` as `name` in `parent`: one more lookup.
    /// A directory new to the guest is watched before the guest hears of
    /// it, so no edit falls between.
    pub(super) fn remember(
        &self,
        parent: u64,
        name: &[u8],
        inode: u64,
        mode: u32,
        watch: Option<&HostWatch>,
    ) {
        let mut nodes = self.lock();
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
        if let (true, Some(w)) = (new_dir, watch) {
            let wd = rel_in(&nodes, inode)
                .ok()
                .and_then(|rel| w.add(inode, &rel));
            if let Some(n) = nodes.get_mut(&inode) {
                n.watch = wd;
            }
        }
    }

    /// The guest dropped `count` lookups of `inode`; at none it is
    /// forgotten, and so is its watch.
    pub(super) fn forget(&self, inode: u64, count: u64, watch: Option<&HostWatch>) {
        let mut nodes = self.lock();
        if let Some(n) = nodes.get_mut(&inode) {
            n.lookups = n.lookups.saturating_sub(count);
            if n.lookups == 0 && inode != ROOT_ID {
                if let (Some(w), Some(wd)) = (watch, n.watch) {
                    w.remove(wd);
                }
                nodes.remove(&inode);
            }
        }
    }

    /// The entry the guest holds for `oldname` in `olddir` now lives at
    /// `newname` in `newdir`.
    pub(super) fn moved(&self, olddir: u64, oldname: &[u8], newdir: u64, newname: &[u8]) {
        if let Some(n) = self
            .lock()
            .values_mut()
            .find(|n| n.parent == olddir && n.name == oldname)
        {
            n.parent = newdir;
            n.name = newname.to_vec();
        }
    }
}
