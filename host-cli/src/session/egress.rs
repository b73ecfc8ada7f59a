//! The session's network: its egress proxy, served on the host's vsock
//! port, fed the secrets the policy grants, and recording every decision in
//! the session's audit log.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use sbx_audit::{AuditLog, Category, Event};
use sbx_egress::{Options, Proxy, Recorder, Stream};
use sbx_policy::{Decision, NetHost, Policy, Surface};
use sbx_protocol::egress::{pem_body, CMDLINE_KEY, HOST_PORT};
use vmm::devices::virtio::vsock::VsockHost;

use crate::secret_cmd::Store;

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
fn granted_secrets(
    policy: &Policy,
    log: &AuditLog,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let store = Store::open();
    let mut out: Vec<(String, String, String)> = Vec::new();
    for (grant, rule) in policy.credential_grants() {
        if out.iter().any(|(n, _, _)| *n == grant.secret) {
            continue;
        }
        match store.get(&grant.secret)? {
            Some(v) => out.push((grant.secret.clone(), grant.env.clone(), v)),
            None => {
                log.append(
                    Category::Session,
                    Event {
                        surface: Some(Surface::Credential.as_str().into()),
                        action: "secret_missing".into(),
                        resource: grant.secret.clone(),
                        rule_id: Some(rule.id.clone()),
                        rule_source: Some(rule.location.to_string()),
                        reason: Some(format!(
                            "rule `{}` grants secret {} but it is not stored; run `sbx secret set {}`",
                            rule.id, grant.secret, grant.secret
                        )),
                        ..Event::default()
                    },
                )?;
            }
        }
    }
    Ok(out)
}

/// Reads a `--resolve NAME:ADDR` (an IPv6 ADDR may be in brackets).
pub fn parse_resolve(spec: &str) -> anyhow::Result<(String, IpAddr)> {
    let usage = || {
        format!("--resolve `{spec}`: expected NAME:ADDR, for example --resolve api.test:127.0.0.2")
    };
    let (name, addr) = spec.split_once(':').with_context(usage)?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = addr.parse().with_context(usage)?;
    match sbx_policy::normalize_host(name) {
        Ok(NetHost::Name(n)) => Ok((n, ip)),
        _ => anyhow::bail!("{}: `{name}` is not a host name", usage()),
    }
}

/// A running proxy and what the guest needs to use it.
pub struct Egress {
    proxy: Arc<Proxy>,
}

impl Egress {
    pub fn start(
        session: &str,
        policy: Arc<Policy>,
        log: Arc<AuditLog>,
        host: &VsockHost,
        upstream_ca: Vec<PathBuf>,
        resolve: &[String],
    ) -> anyhow::Result<Egress> {
        let fixed = resolve
            .iter()
            .map(|r| parse_resolve(r))
            .collect::<anyhow::Result<HashMap<_, _>>>()?;
        let secrets = granted_secrets(&policy, &log)?;
        let names: Vec<&str> = secrets.iter().map(|(n, _, _)| n.as_str()).collect();
        log.append(
            Category::Session,
            Event {
                surface: Some(Surface::Net.as_str().into()),
                action: "egress".into(),
                resource: format!("vsock port {HOST_PORT}"),
                details: serde_json::json!({
                    "secrets": names,
                    "upstream_ca": upstream_ca,
                    "resolve": resolve,
                }),
                ..Event::default()
            },
        )?;
        let mut opts = Options::new(session);
        opts.secrets = secrets;
        opts.upstream_ca = upstream_ca;
        if !fixed.is_empty() {
            opts.resolver = Some(Arc::new(move |name: &str, port| match fixed.get(name) {
                Some(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
                None => Ok((name, port).to_socket_addrs()?.collect()),
            }));
        }
        let proxy = Proxy::new(policy, Arc::new(AuditRecorder(log)), opts)
            .context("cannot start the egress proxy")?;
        let conns = host.listen(HOST_PORT);
        let p = proxy.clone();
        std::thread::Builder::new()
            .name("egress-accept".into())
            .spawn(move || {
                for conn in conns {
                    p.spawn(Stream::Unix(conn));
                }
            })?;
        Ok(Egress { proxy })
    }

    /// The kernel command-line word that hands the guest agent the CA.
    pub fn cmdline_word(&self) -> String {
        format!("{CMDLINE_KEY}={}", pem_body(&self.proxy.ca_pem()))
    }

    /// Placeholders, by the env var names the policy gives.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.proxy.guest_env()
    }
}
