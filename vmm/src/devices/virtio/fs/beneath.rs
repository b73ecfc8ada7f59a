//! Opening host paths beneath a share's root: the host watch and the
//! listings open directories by their path inside the mount, and must never
//! be led out of it by a symlink or `..`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

pub(super) fn cstr(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens `rel` (a path inside the mount; `.` for the root) beneath `root`,
/// without following any symlink on the way or at the end.
pub(super) fn open_beneath(root: &OwnedFd, rel: &[u8], flags: i32) -> io::Result<OwnedFd> {
    let path = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_NOFOLLOW | libc::O_CLOEXEC | flags) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: openat2 reads `how` and `path`, both valid for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the call just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The mount's root as a path descriptor, for [`open_beneath`].
pub(super) fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let path = cstr(root)?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: a plain syscall; the descriptor is owned at once.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the call just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
