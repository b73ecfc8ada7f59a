//! The guest's only way out: a relay on 127.0.0.1 that carries each
//! connection, unread, over vsock to the host's egress proxy, which decides
//! everything. The guest trusts the session CA so the proxy can inject
//! secrets into TLS it intercepts.

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

/// Marks the session CA in the bundle, so the next boot (of a kept disk,
/// or of a template built in a session) replaces it instead of piling up
/// CAs whose sessions are gone.
const MARK: &str = "# sbx session CA (replaced at each boot)";

fn install_ca(pem: &str) {
    let _ = std::fs::create_dir_all("/etc/sbx");
    if let Err(e) = std::fs::write(SESSION_CA, pem) {
        eprintln!("sbx-guest-agent: cannot write {SESSION_CA}: {e}");
    }
    let _ = std::fs::create_dir_all("/etc/ssl/certs");
    let bundle = std::fs::read_to_string(CA_BUNDLE).unwrap_or_default();
    let written = std::fs::write(CA_BUNDLE, with_session_ca(&bundle, pem));
    if let Err(e) = written {
        eprintln!("sbx-guest-agent: cannot add the session CA to {CA_BUNDLE}: {e}");
    }
}

/// `bundle` without an earlier session's CA, then `pem` after the mark.
fn with_session_ca(bundle: &str, pem: &str) -> String {
    let kept = bundle.split_once(MARK).map_or(bundle, |(before, _)| before);
    let mut out = kept.trim_end_matches('\n').to_string();
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(MARK);
    out.push('\n');
    out.push_str(pem.trim_end_matches('\n'));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_ca_replaces_the_last_one() {
        let system = "-----BEGIN CERTIFICATE-----\nsystem\n-----END CERTIFICATE-----\n";
        let first = with_session_ca(system, "PEM one\n");
        assert!(
            first.starts_with(system) && first.ends_with("PEM one\n"),
            "{first}"
        );
        let second = with_session_ca(&first, "PEM two");
        assert_eq!(second, format!("{system}{MARK}\nPEM two\n"));
        assert_eq!(with_session_ca("", "P"), format!("{MARK}\nP\n"));
    }
}
