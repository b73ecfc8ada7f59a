//! Telling the guest's own changes from host edits. Under `auto` the host
//! watch sees every change in a share, the guest's too; the guest kernel
//! already knows its own, so the device marks a name while the guest
//! changes it, and the watch drops the echo while the host entry is as
//! that change left it.

use super::guard::Guard;
use super::host_watch::HostWatch;

/// A change the guest is making, from [`Guard::own`] until dropped.
pub(super) struct Echo<'a>(Option<(&'a HostWatch, u64, Vec<u8>)>);

impl Drop for Echo<'_> {
    fn drop(&mut self) {
        if let Some((w, dir, name)) = &self.0 {
            w.settle(*dir, name);
        }
    }
}

impl Guard {
    /// The guest is about to change `name` in `parent`: the host's echo of
    /// it is not a host edit. Keep the mark until the change is done; its
    /// drop records what the change left on the host.
    pub(super) fn own(&self, parent: u64, name: &[u8]) -> Echo<'_> {
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
    pub(super) fn own_inode(&self, inode: u64) -> Echo<'_> {
        // Without a watch there is nothing to mark: every write comes here.
        if self.watch.is_none() {
            return Echo(None);
        }
        let known = self.nodes.name_of(inode);
        known.map_or(Echo(None), |(parent, name)| self.own(parent, &name))
    }
}
