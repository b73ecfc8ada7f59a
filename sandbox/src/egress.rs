//! The session's network: its egress proxy, served on the host's vsock
//! port, fed the secrets the policy grants, and recording every decision in
//! the session's audit log.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use sbx_audit::{AuditLog, Entry};
use sbx_egress::{Options, Proxy, Recorder, Stream};
use sbx_policy::{Decision, Policy, Surface};
use sbx_protocol::egress::{pem_body, HOST_PORT};
use vmm::devices::virtio::vsock::VsockHost;

use crate::error::{At, Error, Result};
use crate::secrets::Store;
use crate::spec::EgressSpec;

struct AuditRecorder(Arc<AuditLog>);

impl Recorder for AuditRecorder {
    fn decision(&self, surface: Surface, action: &str, what: &str, d: &Decision<'_>) -> bool {
        match self.0.decision(surface, action, what, d) {
            Ok(allowed) => allowed,
            // Nothing goes out that the log cannot show.
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }
}

/// The secrets the policy lets the proxy use, from the store: `(name, env,
/// value)`. Granted secrets that were never stored are recorded.
fn granted_secrets(policy: &Policy, log: &AuditLog) -> Result<Vec<(String, String, String)>> {
    let store = Store::open();
    let mut out: Vec<(String, String, String)> = Vec::new();
    for (grant, rule) in policy.credential_grants() {
        if out.iter().any(|(n, _, _)| *n == grant.secret) {
            continue;
        }
        match store.get(&grant.secret)? {
            Some(v) => out.push((grant.secret.clone(), grant.env.clone(), v)),
            None => {
                log.record(Entry::secret_missing(&grant.secret, rule))?;
            }
        }
    }
    Ok(out)
}

/// A running proxy and what the guest needs to use it.
pub struct Egress {
    proxy: Arc<Proxy>,
    /// The secrets the session holds, `(name, value)`: the MCP gateway
    /// refuses to send them to a server.
    secrets: Vec<(String, String)>,
}

impl Egress {
    pub fn start(
        session: &str,
        spec: &EgressSpec,
        policy: Arc<Policy>,
        log: Arc<AuditLog>,
        host: &VsockHost,
    ) -> Result<Egress> {
        let fixed: HashMap<String, std::net::IpAddr> = spec
            .resolve
            .iter()
            .map(|p| (p.name.clone(), p.addr))
            .collect();
        let secrets = granted_secrets(&policy, &log)?;
        let names: Vec<&str> = secrets.iter().map(|(n, _, _)| n.as_str()).collect();
        let held = secrets
            .iter()
            .map(|(n, _, v)| (n.clone(), v.clone()))
            .collect();
        let resolve: Vec<String> = spec.resolve.iter().map(|p| p.to_string()).collect();
        log.record(Entry::egress_started(
            HOST_PORT,
            &names,
            serde_json::json!({ "upstream_ca": spec.upstream_ca, "resolve": resolve }),
        ))?;
        let mut opts = Options::new(session);
        opts.secrets = secrets;
        opts.upstream_ca = spec.upstream_ca.clone();
        if !fixed.is_empty() {
            opts.resolver = Some(Arc::new(move |name: &str, port| match fixed.get(name) {
                Some(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
                None => Ok((name, port).to_socket_addrs()?.collect()),
            }));
        }
        let proxy = Proxy::new(policy, Arc::new(AuditRecorder(log)), opts)
            .map_err(|e| Error::Session(format!("cannot start the egress proxy: {e}")))?;
        let conns = host.listen(HOST_PORT);
        let p = proxy.clone();
        // Its connections' threads are started from it, under its filter.
        sbx_seccomp::spawn("egress-accept", sbx_seccomp::Kind::Egress, move || {
            for conn in conns {
                p.spawn(Stream::Unix(conn));
            }
        })
        .at(|| "cannot start the egress thread".into())?;
        Ok(Egress {
            proxy,
            secrets: held,
        })
    }

    /// The session CA's PEM body, as the guest agent is handed it.
    pub fn ca_body(&self) -> String {
        pem_body(&self.proxy.ca_pem())
    }

    /// The secrets the session holds, `(name, value)`.
    pub fn secrets(&self) -> &[(String, String)] {
        &self.secrets
    }

    /// Placeholders, by the env var names the policy gives.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.proxy.guest_env()
    }
}
