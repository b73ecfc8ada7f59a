//! AF_VSOCK stream sockets. std has no vsock type; a connected vsock socket
//! is driven with the same read/write/shutdown calls as a Unix stream, so it
//! is wrapped in `UnixStream` for those.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub struct Listener(OwnedFd);

impl Listener {
    pub fn bind(port: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = socket()?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
        // SAFETY: listen on our own socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(Self(fd))
    }

    pub fn accept(&self) -> io::Result<UnixStream> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: accept4 without an address buffer.
            let fd: RawFd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh connected socket we own.
                return Ok(unsafe { UnixStream::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

pub fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let fd = socket()?;
    let a = addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) })?;
    // SAFETY: ownership moves to the stream.
    Ok(unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) })
}
