//! The device's own checks on what the guest asks: names are single
//! components, reads and writes are as the mount and the session allow,
//! listings leave out what the session hides, and a directory rename may
//! not carry a hidden file out from under its rule. Every refusal is
//! reported to the session, naming its rule.

use std::ffi::CStr;
use std::io;
use std::path::Path;

use fuse_backend_rs::api::filesystem::Context;

use super::guard::Guard;
use super::{FsAccess, Refusal, RuleRef};

/// How many entries a directory rename may carry before it is refused with
/// EXDEV (tools then copy and delete, one checked file at a time).
const RENAME_WALK_LIMIT: usize = 20_000;

pub(super) const SETID: u32 = libc::S_ISUID | libc::S_ISGID;

/// Whether a symlink at `link` (a path inside the mount) to `target`
/// points out of the mount: an absolute target always does (a host tool
/// resolves it from the host's root), a relative one when its `..`s climb
/// above the mount's root. The guest resolves links in its own tree; this
/// is about the host's tools, which follow them on the host.
pub(super) fn leaves_share(link: &[u8], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return true;
    }
    // The directory the link is in, as a depth below the root.
    let mut depth = link.split(|&b| b == b'/').filter(|c| !c.is_empty()).count() as isize - 1;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

pub(super) fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// File ownership is the host user's, whoever the guest says is asking:
/// the passthrough then never switches credentials.
pub(super) fn squash(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

pub(super) fn writes(flags: u32) -> bool {
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY || f & (libc::O_TRUNC | libc::O_APPEND) != 0
}

pub(super) fn file_type(mode: u32) -> &'static str {
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
    /// The guest path of `name` in `parent`, once `name` is known to be one
    /// plain component.
    pub(super) fn child(&self, op: &str, parent: u64, name: &CStr) -> io::Result<String> {
        Ok(self.guest_path(&self.child_rel(op, parent, name)?))
    }

    /// As [`Guard::child`], as a path inside the mount, bytes as on the host.
    pub(super) fn child_rel(&self, op: &str, parent: u64, name: &CStr) -> io::Result<Vec<u8>> {
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
    pub(super) fn rel_child(&self, parent: u64, name: &[u8]) -> io::Result<Vec<u8>> {
        let mut rel = self.nodes.rel(parent)?;
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name);
        Ok(rel)
    }

    /// Refuses with one of the device's own protections.
    pub(super) fn refuse(&self, op: &str, path: &str, reason: &str, code: i32) -> io::Result<()> {
        let refusal = Refusal {
            rule: RuleRef::guard(),
            reason: reason.into(),
        };
        self.supervisor.denied(op, path, &refusal);
        Err(err(code))
    }

    /// Reads and writes of `path` as the mount and the policy allow them.
    pub(super) fn check(&self, op: &str, path: &str, access: FsAccess) -> io::Result<()> {
        let (refusal, code) = if access == FsAccess::Write && self.read_only {
            let r = Refusal {
                rule: self.mount_rule.clone(),
                reason: format!("{} is a read-only mount", self.guest_root),
            };
            (r, libc::EROFS)
        } else {
            match self.supervisor.check(path, access) {
                None => return Ok(()),
                Some(r) => (r, libc::EACCES),
            }
        };
        self.supervisor.denied(op, path, &refusal);
        Err(err(code))
    }

    /// Would renaming the directory at `guest` (host `host`) move something a
    /// deny rule covers? Walks the host tree without following symlinks.
    pub(super) fn carries_denied(
        &self,
        host: &Path,
        guest: &str,
    ) -> Result<Option<(String, Refusal)>, ()> {
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
                if let Some(refusal) = self.supervisor.check(&g, FsAccess::Read) {
                    return Ok(Some((g, refusal)));
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), g));
                }
            }
        }
        Ok(None)
    }

    /// Listings leave out what the policy denies; `.` and `..` stay.
    pub(super) fn hidden(&self, dir: &str, name: &[u8]) -> bool {
        if name == b"." || name == b".." {
            return false;
        }
        let path = format!("{dir}/{}", String::from_utf8_lossy(name));
        self.supervisor.check(&path, FsAccess::Read).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::leaves_share;

    #[test]
    fn links_that_leave_the_share() {
        for (link, target, leaves) in [
            ("l", "/etc/passwd", true),
            ("l", "/workspace/x", true),
            ("l", "x", false),
            ("l", "../x", true),
            ("d/l", "../x", false),
            ("d/l", "../../x", true),
            ("d/l", "a/../../x", false),
            ("d/l", "a/../../../x", true),
            ("d/e/l", "./../.././x", false),
            ("l", "", false),
        ] {
            assert_eq!(
                leaves_share(link.as_bytes(), target.as_bytes()),
                leaves,
                "{link} -> {target}"
            );
        }
    }
}
