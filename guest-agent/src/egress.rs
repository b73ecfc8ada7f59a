//! The guest's only way out: a relay on 127.0.0.1 that carries each
//! connection, unread, over vsock to the host's egress proxy, which decides
//! everything. The guest trusts the session CA so the proxy can inject
//! secrets into TLS it intercepts.

use std::io::Write;

use sbx_protocol::egress::{pem_from_body, CA_BUNDLE, GUEST_PORT, HOST_PORT, SESSION_CA};

use crate::relay;

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
    relay::serve(GUEST_PORT, HOST_PORT, "egress proxy")
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
