//! The gateway's side of each upstream server: connecting on first use (a
//! stdio server through the [`Launcher`], which runs it in a microVM of its
//! own; a remote one over Streamable HTTP with its credentials added here),
//! reconnecting after a crash, and the server's last tool listing with each
//! tool's pin state.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{ClientConfig, Implementation, ProgressNotificationParam, Tool};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceExt};

use crate::config::{RemoteServer, ServerSpec, StdioServer, Transport};

/// Starts stdio servers: the sandbox implements it by starting a microVM
/// for the server (once) and running its command there.
pub trait Launcher: Send + Sync + 'static {
    /// Runs `stdio`'s command for `server` and returns its standard input
    /// and output. Blocks until the command runs (its VM may have to boot).
    fn open(&self, server: &ServerSpec, stdio: &StdioServer) -> Result<Pipes, String>;
}

/// A running stdio server's streams, from the gateway's side.
pub struct Pipes {
    /// Writes go to the server's standard input.
    pub to_server: OwnedFd,
    /// Reads come from the server's standard output.
    pub from_server: OwnedFd,
}

/// Tells the gateway what a server says on its own: its lists changed (so
/// the agents are told), progress on a call (passed to the agent that made
/// it).
#[derive(Clone)]
pub(crate) struct Watcher {
    pub changed: Arc<dyn Fn(ListKind) + Send + Sync>,
    pub progress: Arc<dyn Fn(ProgressNotificationParam) + Send + Sync>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum ListKind {
    Tools,
    Resources,
    Prompts,
}

impl ClientHandler for Watcher {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        (self.progress)(params)
    }
    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        (self.changed)(ListKind::Tools)
    }
    async fn on_resource_list_changed(&self, _: NotificationContext<RoleClient>) {
        (self.changed)(ListKind::Resources)
    }
    async fn on_prompt_list_changed(&self, _: NotificationContext<RoleClient>) {
        (self.changed)(ListKind::Prompts)
    }
    fn get_info(&self) -> ClientConfig {
        let mut c = ClientConfig::default();
        c.client_info = Implementation::new("sbx-mcp-gateway", env!("CARGO_PKG_VERSION"));
        c
    }
}

pub(crate) type Client = RunningService<RoleClient, Watcher>;

/// A tool as last listed, with what the pins say of it.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub tool: Tool,
    pub hash: String,
    /// `Some((approved, seen))` while quarantined.
    pub quarantined: Option<(String, String)>,
}

/// One upstream server.
pub(crate) struct Upstream {
    pub spec: ServerSpec,
    conn: tokio::sync::Mutex<Option<Arc<Client>>>,
    pub tools: Mutex<Option<Vec<Listed>>>,
    /// Why the last start failed, for `sbx mcp ls`.
    pub last_error: Mutex<Option<String>>,
}

impl Upstream {
    pub fn new(spec: ServerSpec) -> Upstream {
        Upstream {
            spec,
            conn: tokio::sync::Mutex::new(None),
            tools: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.spec.timeout_secs)
    }

    /// Whether a connection is up (without starting one).
    pub fn running(&self) -> bool {
        self.conn
            .try_lock()
            .map(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
            .unwrap_or(true)
    }

    /// The connection, made (or remade, after a crash) when needed; `fresh`
    /// says whether it was just made.
    pub async fn client(
        &self,
        launcher: &Arc<dyn Launcher>,
        bearer: Option<&str>,
        watcher: Watcher,
    ) -> Result<(Arc<Client>, bool), String> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            if !c.is_closed() {
                return Ok((c.clone(), false));
            }
        }
        *conn = None;
        let made = tokio::time::timeout(
            // A VM boots first: allow more than one request's time.
            self.timeout().max(Duration::from_secs(120)),
            self.connect(launcher, bearer, watcher),
        )
        .await
        .unwrap_or_else(|_| Err("did not finish starting in time".into()));
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match made {
            Ok(c) => {
                *last = None;
                let c = Arc::new(c);
                *conn = Some(c.clone());
                Ok((c, true))
            }
            Err(e) => {
                *last = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Drops a connection that failed, so the next request starts anew.
    pub async fn reset(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.cancellation_token().cancel();
        }
    }

    async fn connect(
        &self,
        launcher: &Arc<dyn Launcher>,
        bearer: Option<&str>,
        watcher: Watcher,
    ) -> Result<Client, String> {
        match &self.spec.transport {
            Transport::Stdio(stdio) => {
                let (launcher, spec, stdio) = (launcher.clone(), self.spec.clone(), stdio.clone());
                let pipes = tokio::task::spawn_blocking(move || launcher.open(&spec, &stdio))
                    .await
                    .map_err(|e| e.to_string())??;
                let to = tokio::net::unix::pipe::Sender::from_owned_fd(pipes.to_server)
                    .map_err(|e| format!("cannot use its standard input: {e}"))?;
                let from = tokio::net::unix::pipe::Receiver::from_owned_fd(pipes.from_server)
                    .map_err(|e| format!("cannot use its standard output: {e}"))?;
                watcher
                    .serve((from, to))
                    .await
                    .map_err(|e| format!("did not complete the MCP handshake: {e}"))
            }
            Transport::Remote(remote) => {
                let client = http_client(remote)?;
                let mut config =
                    rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
                        remote.url.as_str(),
                    );
                if let Some(token) = bearer {
                    config = config.auth_header(token);
                }
                let transport =
                    rmcp::transport::StreamableHttpClientTransport::with_client(client, config);
                watcher
                    .serve(transport)
                    .await
                    .map_err(|e| format!("cannot reach {}: {e}", remote.url))
            }
        }
    }
}

/// An HTTP client that trusts what the egress proxy trusts upstream (the
/// host's roots) and the server's own CA.
fn http_client(remote: &RemoteServer) -> Result<reqwest::Client, String> {
    let extra: Vec<&std::path::Path> = remote.ca.iter().map(|p| p.as_path()).collect();
    let tls = sbx_egress::mitm::upstream_config(&extra).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        // Credentials never follow a redirect to another host.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}
