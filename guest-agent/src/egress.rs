//! The guest's only way out: a relay on 127.0.0.1 that carries each
//! connection, unread, over vsock to the host's egress proxy, which decides
//! everything. The guest trusts the session CA so the proxy can inject
//! secrets into TLS it intercepts.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;

use sbx_protocol::egress::{pem_from_body, CA_BUNDLE, GUEST_PORT, HOST_PORT, SESSION_CA};

use crate::vsock;

/// Sets up egress when the host asked for it (`sbx.egress=<CA>`); returns
/// whether it did.
pub fn start(ca_body: Option<String>) -> bool {
    let Some(body) = ca_body else {
        return false;
    };
    match pem_from_body(&body) {
        Some(pem) => install_ca(&pem),
        None => eprintln!("sbx-guest-agent: the session CA on the command line is not base64"),
    }
    if let Err(e) = loopback_up() {
        eprintln!("sbx-guest-agent: cannot bring up lo: {e}");
    }
    let listener = match TcpListener::bind(("127.0.0.1", GUEST_PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sbx-guest-agent: cannot listen on 127.0.0.1:{GUEST_PORT}: {e}");
            return false;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("egress".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("egress-conn".into())
                    .spawn(move || relay(conn));
            }
        });
    spawned.is_ok()
}

fn install_ca(pem: &str) {
    let _ = std::fs::create_dir_all("/etc/sbx");
    if let Err(e) = std::fs::write(SESSION_CA, pem) {
        eprintln!("sbx-guest-agent: cannot write {SESSION_CA}: {e}");
    }
    let _ = std::fs::create_dir_all("/etc/ssl/certs");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(CA_BUNDLE)
        .and_then(|mut f| f.write_all(format!("\n{pem}").as_bytes()));
    if let Err(e) = appended {
        eprintln!("sbx-guest-agent: cannot add the session CA to {CA_BUNDLE}: {e}");
    }
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

fn relay(client: TcpStream) {
    let _ = client.set_nodelay(true);
    let host = match vsock::connect(vsock::HOST_CID, HOST_PORT) {
        Ok(h) => h,
        Err(e) => {
            let body = format!("sbx guest relay: cannot reach the host's egress proxy: {e}\n");
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
