//! How guest programs reach the network: a relay on the guest's loopback
//! that carries each connection over vsock to the host's egress proxy.

/// The host serves its egress proxy on this vsock port.
pub const HOST_PORT: u32 = 1026;
/// The guest agent's relay listens on 127.0.0.1 at this port.
pub const GUEST_PORT: u16 = 3128;
/// The trust bundle in the rootfs; the session CA is appended to it.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The session CA alone, for tools that add to their own roots.
pub const SESSION_CA: &str = "/etc/sbx/egress-ca.pem";

/// The environment every guest process gets when the session has egress:
/// the usual proxy settings and trust-store settings of curl, git, pip,
/// npm, node and cargo.
pub fn environment() -> Vec<(&'static str, String)> {
    let proxy = format!("http://127.0.0.1:{GUEST_PORT}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    let mut env = Vec::new();
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "npm_config_proxy",
        "npm_config_https_proxy",
        "PIP_PROXY",
        "CARGO_HTTP_PROXY",
    ] {
        env.push((k, proxy.clone()));
    }
    env.push(("NO_PROXY", no_proxy.clone()));
    env.push(("no_proxy", no_proxy));
    for k in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "npm_config_cafile",
        "CARGO_HTTP_CAINFO",
    ] {
        env.push((k, CA_BUNDLE.to_string()));
    }
    env.push(("NODE_EXTRA_CA_CERTS", SESSION_CA.to_string()));
    env
}

/// The base64 body of a PEM certificate, as it travels on the command line.
pub fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
}

/// A PEM certificate from its base64 body; None if it is not base64.
pub fn pem_from_body(body: &str) -> Option<String> {
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    {
        return None;
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).ok()?);
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    Some(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_the_command_line() {
        let body = "QUJD".repeat(40);
        let pem = pem_from_body(&body).unwrap();
        assert_eq!(pem_body(&pem), body);
        assert!(pem_from_body("a b").is_none());
        assert!(pem_from_body("").is_none());
    }
}
