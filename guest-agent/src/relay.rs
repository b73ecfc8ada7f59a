//! Relays on the guest's loopback: each connection to a port on 127.0.0.1
//! is carried, unread, over vsock to a host port (the egress proxy, the MCP
//! gateway), which decides everything.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;

use crate::vsock;

/// Listens on 127.0.0.1:`guest_port` and relays every connection to the
/// host's vsock `host_port`; returns whether it listens.
pub fn serve(guest_port: u16, host_port: u32, what: &'static str) -> bool {
    if let Err(e) = loopback_up() {
        eprintln!("sbx-guest-agent: cannot bring up lo: {e}");
    }
    let listener = match TcpListener::bind(("127.0.0.1", guest_port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sbx-guest-agent: cannot listen on 127.0.0.1:{guest_port}: {e}");
            return false;
        }
    };
    let spawned = std::thread::Builder::new()
        .name(format!("relay-{guest_port}"))
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("relay-conn".into())
                    .spawn(move || relay(conn, host_port, what));
            }
        });
    spawned.is_ok()
}

/// The kernel creates `lo` down; the relay needs it up.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is valid. The name fits.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write one ifreq.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(())
}

fn relay(client: TcpStream, host_port: u32, what: &str) {
    let _ = client.set_nodelay(true);
    let host = match vsock::connect(vsock::HOST_CID, host_port) {
        Ok(h) => h,
        Err(e) => {
            let body = format!("sbx guest relay: cannot reach the host's {what}: {e}\n");
            let _ = (&client).write_all(
                format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            return;
        }
    };
    let (Ok(c2), Ok(h2)) = (client.try_clone(), host.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut &h2, &mut &c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut &client, &mut &host);
    let _ = UnixStream::shutdown(&host, Shutdown::Write);
    let _ = back.join();
}
