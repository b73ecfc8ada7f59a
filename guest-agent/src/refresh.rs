//! Host edits to shared directories. The guest kernel trusts what it
//! cached of a share for up to a minute, and Linux's virtio-fs gives the
//! device no way to take that back, so the VMM watches the host and sends
//! the changed paths here; each is revalidated without being changed.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::Path;

/// Revalidates `paths` and the directories holding them; for each of
/// `trees`, drops every cached name the kernel can drop.
pub fn run(paths: &[String], trees: &[String]) {
    let shares = crate::init::shares();
    let inside = |p: &str| {
        shares
            .iter()
            .any(|s| p == s || p.starts_with(&format!("{s}/")))
    };
    if trees.iter().any(|t| inside(t)) {
        // What is in use (open files, working directories) stays; it is
        // revalidated below and by the attribute timeout.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    }
    let mut dirs = BTreeSet::new();
    // Sorted, so a directory comes before what is in it.
    let paths: BTreeSet<&String> = paths.iter().filter(|p| inside(p)).collect();
    for p in paths {
        revalidate(p);
        if let Some(d) = Path::new(p).parent().and_then(Path::to_str) {
            dirs.insert(d.to_string());
        }
    }
    dirs.extend(trees.iter().filter(|t| inside(t)).cloned());
    for d in dirs {
        fresh_attributes(&d);
    }
}

/// Makes the kernel ask the device about `path` again: a hard link to it
/// from another file system looks the name up as for a create, which
/// always asks (FUSE revalidates a cached entry, present or absent, on
/// LOOKUP_EXCL), then fails with EEXIST or EXDEV: nothing is made.
fn revalidate(path: &str) {
    let (Ok(from), Ok(to)) = (CString::new("/"), CString::new(path)) else {
        return;
    };
    // SAFETY: two valid path strings; the call cannot succeed across mounts.
    unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            0,
        )
    };
}

/// Fetches `dir`'s attributes from the device now, so a changed mtime
/// drops the kernel's cached listing of it.
fn fresh_attributes(dir: &str) {
    let Ok(c) = CString::new(dir) else {
        return;
    };
    // SAFETY: statx fills a buffer we own.
    unsafe {
        let mut buf: libc::statx = std::mem::zeroed();
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS,
            &mut buf,
        );
    }
}
