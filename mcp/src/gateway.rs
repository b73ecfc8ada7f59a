//! The gateway: one MCP server towards the agent that aggregates the
//! allowed tools, resources and prompts of every configured server, and
//! decides every request with the one policy engine before it goes out.
//!
//! A request passes, in order: the policy (`decide_mcp`, with its
//! arguments), the rule's `calls_per_minute`, the tool's pin (a changed
//! tool is quarantined), and the secret scan (the session's own secrets in
//! any common encoding are refused; well-known credentials are redacted or
//! refused as the server's `on_credential` says). Exactly one decision
//! record is written per request, before it goes out; an allowed request's
//! outcome (latency, size, error) follows in a second record. The audit
//! log is written synchronously: under load the gateway slows down, it
//! never drops a record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult,
    CancelledNotificationParam, ClientRequest, ErrorCode, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, JsonObject, ListPromptsResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ProgressToken, Prompt, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    RequestId, Resource, ServerCapabilities, ServerConfig, ServerResult, Tool,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RequestContext};
use rmcp::{ErrorData, RoleClient, RoleServer, ServerHandler};
use sbx_audit::{AuditLog, Entry};
use sbx_policy::{Decision, Policy, RateLimiter, Verdict};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::{OnCredential, ServerSpec};
use crate::names;
use crate::pins::{tool_hash, Pins, Sighting};
use crate::scan::{self, Scanner};
use crate::upstream::{Launcher, ListKind, Listed, Upstream, Watcher};

/// The JSON-RPC error code of a refusal (the server-defined range).
pub const REFUSED: i32 = -32001;
/// The JSON-RPC error code of a server that failed or timed out.
pub const UPSTREAM_FAILED: i32 = -32002;

/// What a gateway is made of.
pub struct Options {
    pub servers: Vec<ServerSpec>,
    pub policy: Arc<Policy>,
    pub log: Arc<AuditLog>,
    pub pins: Pins,
    /// The session's secrets, `(name, value)`: never sent to a server.
    pub secrets: Vec<(String, String)>,
    /// Remote servers' bearer tokens, by server name.
    pub bearers: HashMap<String, String>,
    pub launcher: Arc<dyn Launcher>,
}

/// An agent's progress token, and the agent to send its progress to.
type AgentToken = (Peer<RoleServer>, ProgressToken);

/// One session's gateway, shared by every connection to it.
pub struct Gateway {
    servers: Vec<Upstream>,
    policy: Arc<Policy>,
    log: Arc<AuditLog>,
    pins: Pins,
    scanner: Scanner,
    bearers: HashMap<String, String>,
    launcher: Arc<dyn Launcher>,
    rate: Mutex<RateLimiter>,
    /// The agents connected, told when a server's lists change.
    peers: Mutex<Vec<Peer<RoleServer>>>,
    /// Which server each resource URI came from, as last listed.
    resources: Mutex<HashMap<String, usize>>,
    /// Calls in flight that asked for progress: the token the gateway gave
    /// the server, and the agent's peer and token it stands for.
    progress: Mutex<HashMap<(usize, ProgressToken), AgentToken>>,
    me: Weak<Gateway>,
}

/// A server's state, for `sbx mcp ls`.
#[derive(Debug, serde::Serialize)]
pub struct ServerState {
    pub name: String,
    pub kind: &'static str,
    pub running: bool,
    pub tools: Option<usize>,
    pub quarantined: Vec<String>,
    pub last_error: Option<String>,
    pub declared: String,
}

/// A tool as `sbx mcp tools` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ToolState {
    pub server: String,
    pub tool: String,
    pub exposed: String,
    pub description: Option<String>,
    pub hash: String,
    /// `pinned`, `quarantined`, or `denied` (the policy leaves it out).
    pub state: &'static str,
    pub approved: Option<String>,
}

/// A refusal as the agent gets it: the JSON-RPC error names the rule.
fn refused(message: String, rule: &str, layer: &str, source: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode(REFUSED),
        message,
        Some(json!({ "rule": rule, "layer": layer, "source": source })),
    )
}

fn upstream_failed(server: &str, message: impl std::fmt::Display) -> ErrorData {
    ErrorData::new(
        ErrorCode(UPSTREAM_FAILED),
        format!("MCP server `{server}` failed: {message}"),
        Some(json!({ "server": server })),
    )
}

fn digest(v: &Value) -> String {
    let d = Sha256::digest(v.to_string().as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// What the gateway's own checks concluded about a request.
enum Check {
    Pass { redacted: Vec<&'static str> },
    Refuse { rule: &'static str, reason: String },
}

impl Gateway {
    pub fn new(o: Options) -> Arc<Gateway> {
        Arc::new_cyclic(|me| Gateway {
            servers: o.servers.into_iter().map(Upstream::new).collect(),
            policy: o.policy,
            log: o.log,
            pins: o.pins,
            scanner: Scanner::new(&o.secrets),
            bearers: o.bearers,
            launcher: o.launcher,
            rate: Mutex::new(RateLimiter::default()),
            peers: Mutex::new(Vec::new()),
            resources: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    fn server(&self, name: &str) -> Option<(usize, &Upstream)> {
        self.servers
            .iter()
            .enumerate()
            .find(|(_, u)| u.spec.name == name)
    }

    fn watcher(&self, server: usize) -> Watcher {
        let me = self.me.clone();
        let me2 = self.me.clone();
        Watcher {
            progress: Arc::new(move |mut p: ProgressNotificationParam| {
                let Some(g) = me2.upgrade() else { return };
                let found = g
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(server, p.progress_token.clone()))
                    .cloned();
                // Progress for a call not in flight is dropped: a server
                // cannot reach other calls' tokens.
                if let Some((peer, token)) = found {
                    p.progress_token = token;
                    tokio::spawn(async move {
                        let _ = peer.notify_progress(p).await;
                    });
                }
            }),
            changed: Arc::new(move |kind| {
                if let Some(g) = me.upgrade() {
                    if matches!(kind, ListKind::Tools) {
                        *g.servers[server]
                            .tools
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    tokio::spawn(async move { g.tell_peers(kind).await });
                }
            }),
        }
    }

    /// Passes a server's `list_changed` on to every connected agent.
    async fn tell_peers(&self, kind: ListKind) {
        let peers: Vec<Peer<RoleServer>> =
            self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut gone = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            let sent = match kind {
                ListKind::Tools => p.notify_tool_list_changed().await.is_ok(),
                ListKind::Resources => p.notify_resource_list_changed().await.is_ok(),
                ListKind::Prompts => p.notify_prompt_list_changed().await.is_ok(),
            };
            if !sent {
                gone.push(i);
            }
        }
        let mut all = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for i in gone.into_iter().rev() {
            if i < all.len() {
                all.remove(i);
            }
        }
    }

    fn record(&self, entry: Entry) -> Result<(), ErrorData> {
        self.log.record(entry).map(drop).map_err(|e| {
            // Nothing goes out that the log cannot show.
            tracing::error!("{e}");
            ErrorData::internal_error(format!("the audit log failed: {e}"), None)
        })
    }

    async fn client(&self, index: usize) -> Result<Arc<crate::upstream::Client>, ErrorData> {
        let up = &self.servers[index];
        let bearer = self.bearers.get(&up.spec.name).map(String::as_str);
        match up.client(&self.launcher, bearer, self.watcher(index)).await {
            Ok((c, fresh)) => {
                if fresh {
                    self.record(Entry::mcp_server(
                        "server_started",
                        &up.spec.name,
                        json!({ "declared": up.spec.declared }),
                    ))?;
                }
                Ok(c)
            }
            Err(e) => {
                self.record(Entry::mcp_server(
                    "server_failed",
                    &up.spec.name,
                    json!({ "error": e }),
                ))?;
                Err(upstream_failed(&up.spec.name, e))
            }
        }
    }

    /// Runs `f` against server `index` within its timeout; a failure
    /// drops the connection, so the next request starts the server again.
    async fn upstream<T, F>(
        &self,
        index: usize,
        ct: Option<&tokio_util::sync::CancellationToken>,
        f: impl FnOnce(Arc<crate::upstream::Client>) -> F,
    ) -> Result<T, ErrorData>
    where
        F: std::future::Future<Output = Result<T, rmcp::ServiceError>>,
    {
        let up = &self.servers[index];
        let client = self.client(index).await?;
        let call = tokio::time::timeout(up.timeout(), f(client));
        let outcome = match ct {
            Some(ct) => tokio::select! {
                r = call => r,
                () = ct.cancelled() => {
                    return Err(ErrorData::new(ErrorCode::INVALID_REQUEST, "cancelled", None))
                }
            },
            None => call.await,
        };
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(rmcp::ServiceError::McpError(e))) => Err(e),
            Ok(Err(e)) => {
                up.reset().await;
                Err(upstream_failed(
                    &up.spec.name,
                    format!("{e}; it is started again on the next request"),
                ))
            }
            Err(_) => Err(upstream_failed(
                &up.spec.name,
                format!("no answer within {} s", up.spec.timeout_secs),
            )),
        }
    }

    /// Lists server `index`'s tools afresh and checks each against its pin.
    async fn refresh_tools(&self, index: usize) -> Result<Vec<Listed>, ErrorData> {
        let up = &self.servers[index];
        let tools = self
            .upstream(
                index,
                None,
                |c| async move { c.peer().list_all_tools().await },
            )
            .await?;
        let hashed: Vec<(String, String)> = tools
            .iter()
            .map(|t| (t.name.to_string(), tool_hash(t)))
            .collect();
        let sightings = self
            .pins
            .see(&up.spec.name, &hashed)
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let others: Vec<String> = self
            .servers
            .iter()
            .filter(|o| o.spec.name != up.spec.name)
            .filter_map(|o| o.tools.lock().ok().and_then(|t| t.clone()))
            .flatten()
            .map(|l| l.tool.name.to_string())
            .collect();
        let other_refs: Vec<&str> = others.iter().map(String::as_str).collect();
        let mut listed = Vec::with_capacity(tools.len());
        for ((tool, (name, hash)), sighting) in tools.into_iter().zip(hashed).zip(sightings) {
            let resource = format!("{}.{name}", up.spec.name);
            let mut quarantined = None;
            let look = match &sighting {
                Sighting::New => {
                    self.record(Entry::mcp_server(
                        "tool_pinned",
                        &resource,
                        json!({ "hash": hash }),
                    ))?;
                    true
                }
                Sighting::Same => false,
                Sighting::Changed {
                    approved,
                    seen,
                    first,
                } => {
                    if *first {
                        self.record(Entry::mcp_server(
                            "tool_changed",
                            &resource,
                            json!({
                                "approved": approved,
                                "seen": seen,
                                "what_to_do": format!("review it with `sbx mcp tools`, then `sbx mcp approve {} {name}`", up.spec.name),
                            }),
                        ))?;
                    }
                    quarantined = Some((approved.clone(), seen.clone()));
                    *first
                }
            };
            if look {
                let why = scan::steering(tool.description.as_deref().unwrap_or(""), &other_refs);
                if !why.is_empty() {
                    self.record(Entry::mcp_server(
                        "tool_flagged",
                        &resource,
                        json!({ "why": why, "hash": hash }),
                    ))?;
                }
            }
            listed.push(Listed {
                tool,
                hash,
                quarantined,
            });
        }
        *up.tools.lock().unwrap_or_else(|e| e.into_inner()) = Some(listed.clone());
        Ok(listed)
    }

    /// Every server's tools, listed afresh, side by side.
    async fn refresh_all(&self) -> Vec<Result<Vec<Listed>, ErrorData>> {
        futures::future::join_all((0..self.servers.len()).map(|i| self.refresh_tools(i))).await
    }

    /// The tools the agent sees: every server's, listed afresh, less the
    /// quarantined and those the policy leaves out, named `server__tool`.
    /// A server that fails is left out; the others still answer.
    pub async fn tools(&self) -> Vec<Tool> {
        let lists = self.refresh_all().await;
        let mut out = Vec::new();
        for (up, list) in self.servers.iter().zip(lists) {
            let Ok(list) = list else { continue };
            for l in list {
                if l.quarantined.is_some() || !self.policy.mcp_listed(&up.spec.name, &l.tool.name) {
                    continue;
                }
                let mut t = l.tool;
                t.name = names::exposed(&up.spec.name, &t.name).into();
                out.push(t);
            }
        }
        out
    }

    /// Every tool of every server with its pin and policy state.
    pub async fn tool_states(&self) -> Vec<ToolState> {
        let lists = self.refresh_all().await;
        let mut out = Vec::new();
        for (up, list) in self.servers.iter().zip(lists) {
            for l in list.unwrap_or_default() {
                let server = up.spec.name.clone();
                let state = if l.quarantined.is_some() {
                    "quarantined"
                } else if self.policy.mcp_listed(&server, &l.tool.name) {
                    "pinned"
                } else {
                    "denied"
                };
                out.push(ToolState {
                    exposed: names::exposed(&server, &l.tool.name),
                    tool: l.tool.name.to_string(),
                    description: l.tool.description.as_deref().map(str::to_string),
                    approved: l.quarantined.as_ref().map(|q| q.0.clone()),
                    hash: l.hash,
                    state,
                    server,
                });
            }
        }
        out
    }

    /// The servers and their state.
    pub fn server_states(&self) -> Vec<ServerState> {
        self.servers
            .iter()
            .map(|u| {
                let tools = u.tools.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ServerState {
                    name: u.spec.name.clone(),
                    kind: match u.spec.transport {
                        crate::config::Transport::Stdio(_) => "stdio (microVM)",
                        crate::config::Transport::Remote(_) => "remote",
                    },
                    running: u.running(),
                    tools: tools.as_ref().map(Vec::len),
                    quarantined: tools
                        .iter()
                        .flatten()
                        .filter(|l| l.quarantined.is_some())
                        .map(|l| l.tool.name.to_string())
                        .collect(),
                    last_error: u
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    declared: u.spec.declared.clone(),
                }
            })
            .collect()
    }

    /// Approves `server`'s changed tools (one, or all) and records it.
    pub fn approve(&self, server: &str, tool: Option<&str>) -> Result<Vec<String>, String> {
        let done = self.pins.approve(server, tool).map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        for (t, old, new) in done {
            self.record(Entry::mcp_server(
                "tool_approved",
                &format!("{server}.{t}"),
                json!({ "old": old, "new": new }),
            ))
            .map_err(|e| e.message.to_string())?;
            names.push(t);
        }
        if let Some((i, _)) = self.server(server) {
            *self.servers[i]
                .tools
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
        Ok(names)
    }

    /// The gateway's own checks of what goes to a server: the session's
    /// secrets are refused; credentials as `on`.
    fn check_outgoing(&self, args: &mut Value, on: OnCredential) -> Check {
        if let Some(f) = self.scanner.secret_in_value(args) {
            return Check::Refuse {
                rule: "mcp-secret-scan",
                reason: format!(
                    "the arguments carry the session secret {} ({})",
                    f.secret, f.encoding
                ),
            };
        }
        let kinds = scan::credentials_in(args);
        if kinds.is_empty() {
            return Check::Pass { redacted: vec![] };
        }
        match on {
            OnCredential::Refuse => Check::Refuse {
                rule: "mcp-credential-scan",
                reason: format!("the arguments carry a credential ({})", kinds.join(", ")),
            },
            OnCredential::Redact => Check::Pass {
                redacted: scan::redact_credentials(args),
            },
        }
    }

    /// The gateway's checks of what comes back: session secrets are
    /// redacted; credentials redacted or refused as `on` says.
    fn check_incoming(&self, result: &mut Value, on: OnCredential) -> Check {
        let mut redacted = Vec::new();
        if self.scanner.redact_secrets(result) > 0 {
            redacted.push("session secret");
        }
        let kinds = scan::credentials_in(result);
        if !kinds.is_empty() {
            match on {
                OnCredential::Refuse => {
                    return Check::Refuse {
                        rule: "mcp-credential-scan",
                        reason: format!("the result carries a credential ({})", kinds.join(", ")),
                    }
                }
                OnCredential::Redact => redacted.extend(scan::redact_credentials(result)),
            }
        }
        Check::Pass { redacted }
    }

    /// Decides a request to `server` (`name`: the tool, `resources/read`
    /// or `prompts/get`) with `args` and records the one decision record.
    /// On success, returns what the scan redacted from the arguments.
    fn admit(
        &self,
        action: &str,
        server: &Upstream,
        name: &str,
        args: &mut JsonObject,
        pin: Option<&(String, String)>,
    ) -> Result<Vec<&'static str>, ErrorData> {
        let resource = format!("{}.{name}", server.spec.name);
        let mut details = json!({ "args_digest": digest(&Value::Object(args.clone())) });
        let (d, rate) = self.policy.decide_mcp(&server.spec.name, name, args);
        if self.policy.mcp_logs_args(d.rule) {
            // Values as the policy asks, never the secrets among them.
            let mut values = Value::Object(args.clone());
            self.scanner.redact_secrets(&mut values);
            scan::redact_credentials(&mut values);
            details["args"] = values;
        }
        if !d.allowed() {
            self.record(Entry::mcp_decision(action, &resource, &d, details))?;
            return Err(refused(
                sbx_audit::denial(action, &resource, &d),
                &d.rule.id,
                d.rule.layer.as_str(),
                &d.rule.location.to_string(),
            ));
        }
        if let Some(n) = rate {
            let ok = self.rate.lock().unwrap_or_else(|e| e.into_inner()).check(
                &d.rule.id,
                n,
                Instant::now(),
            );
            if !ok {
                let limited = Decision {
                    verdict: Verdict::Deny,
                    rule: d.rule,
                    reason: format!(
                        "rule `{}` allows at most {n} calls a minute and they are used up",
                        d.rule.id
                    )
                    .into(),
                    matched: Vec::new(),
                };
                self.record(Entry::mcp_decision(action, &resource, &limited, details))?;
                return Err(refused(
                    sbx_audit::denial(action, &resource, &limited),
                    &d.rule.id,
                    d.rule.layer.as_str(),
                    &d.rule.location.to_string(),
                ));
            }
        }
        let mut value = Value::Object(std::mem::take(args));
        let check = match pin {
            Some((approved, seen)) => Check::Refuse {
                rule: "mcp-pin",
                reason: format!(
                    "the tool changed since it was approved ({approved} -> {seen}); review it with `sbx mcp tools` and run `sbx mcp approve {} {name}`",
                    server.spec.name
                ),
            },
            None => self.check_outgoing(&mut value, server.spec.on_credential),
        };
        if let Value::Object(m) = value {
            *args = m;
        }
        match check {
            Check::Refuse { rule, reason } => {
                self.record(Entry::mcp_refused(
                    action, &resource, rule, &reason, details,
                ))?;
                Err(refused(
                    format!("sbx refuses {action} {resource}: {reason} (rule `{rule}`, builtin)"),
                    rule,
                    "builtin",
                    "builtin",
                ))
            }
            Check::Pass { redacted } => {
                if !redacted.is_empty() {
                    details["redacted"] = json!(redacted);
                }
                self.record(Entry::mcp_decision(action, &resource, &d, details))?;
                Ok(redacted)
            }
        }
    }

    /// Scans a result, records the request's outcome, and returns the
    /// result (or the refusal of it).
    fn finish<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        action: &str,
        server: &Upstream,
        name: &str,
        started: Instant,
        outcome: Result<T, ErrorData>,
    ) -> Result<T, ErrorData> {
        let resource = format!("{}.{name}", server.spec.name);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let result = match outcome {
            Ok(r) => r,
            Err(e) => {
                self.record(Entry::mcp_result(
                    action,
                    &resource,
                    json!({ "latency_ms": ms, "error": e.message }),
                ))?;
                return Err(e);
            }
        };
        let mut value = serde_json::to_value(&result)
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let size = value.to_string().len();
        match self.check_incoming(&mut value, server.spec.on_credential) {
            Check::Refuse { rule, reason } => {
                self.record(Entry::mcp_result(
                    action,
                    &resource,
                    json!({ "latency_ms": ms, "result_bytes": size, "refused": reason, "rule": rule }),
                ))?;
                Err(refused(
                    format!(
                        "sbx refuses the result of {resource}: {reason} (rule `{rule}`, builtin)"
                    ),
                    rule,
                    "builtin",
                    "builtin",
                ))
            }
            Check::Pass { redacted } => {
                let mut details = json!({ "latency_ms": ms, "result_bytes": size });
                if !redacted.is_empty() {
                    details["redacted"] = json!(redacted);
                }
                self.record(Entry::mcp_result(action, &resource, details))?;
                if redacted.is_empty() {
                    return Ok(result);
                }
                serde_json::from_value(value)
                    .map_err(|e| ErrorData::internal_error(e.to_string(), None))
            }
        }
    }

    /// `tools/call` of `name` (`server__tool`, or `server.tool`).
    pub async fn call(
        &self,
        name: &str,
        arguments: Option<JsonObject>,
        ct: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<CallToolResult, ErrorData> {
        self.call_with_progress(name, arguments, ct, None).await
    }

    /// [`Gateway::call`], passing the server's progress notifications on to
    /// `progress` (the agent's peer and its token), under a token of the
    /// gateway's own towards the server.
    pub async fn call_with_progress(
        &self,
        name: &str,
        arguments: Option<JsonObject>,
        ct: Option<&tokio_util::sync::CancellationToken>,
        progress: Option<(Peer<RoleServer>, ProgressToken)>,
    ) -> Result<CallToolResult, ErrorData> {
        let unknown = || {
            ErrorData::new(
                ErrorCode::INVALID_PARAMS,
                format!("no tool `{name}`: call `tools/list` for the tools this session may use"),
                None,
            )
        };
        let (server, tool) = names::split(name).ok_or_else(unknown)?;
        let (index, up) = self.server(server).ok_or_else(unknown)?;
        let known = up.tools.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A tool not listed yet, or quarantined (it may have been approved
        // since, by `sbx mcp approve` without a session), is looked up anew.
        let listed = match known {
            Some(l)
                if l.iter()
                    .any(|t| t.tool.name == tool && t.quarantined.is_none()) =>
            {
                l
            }
            _ => self.refresh_tools(index).await?,
        };
        let entry = listed
            .iter()
            .find(|t| t.tool.name == tool)
            .ok_or_else(unknown)?;
        let mut args = arguments.unwrap_or_default();
        self.admit("call", up, tool, &mut args, entry.quarantined.as_ref())?;
        let started = Instant::now();
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args);
        // rmcp gives every request a progress token of its own; the agent's
        // is mapped to it while the call is in flight.
        let registered = Mutex::new(None);
        let register = |token: ProgressToken| {
            if let Some(p) = progress {
                self.progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((index, token.clone()), p);
                *registered.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
            }
        };
        let outcome = self
            .upstream(index, ct, |c| async move {
                call_upstream(c.peer(), params, register).await
            })
            .await;
        if let Some(t) = registered.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(index, t));
        }
        self.finish("call", up, tool, started, outcome)
    }

    /// `resources/list`: every server's resources, from the servers whose
    /// resources the policy lets the agent read at all.
    pub async fn list_resources(&self) -> Vec<Resource> {
        let lists = futures::future::join_all((0..self.servers.len()).map(|i| {
            self.upstream(
                i,
                None,
                |c| async move { c.peer().list_all_resources().await },
            )
        }))
        .await;
        let mut owners = HashMap::new();
        let mut out = Vec::new();
        for (i, list) in lists.into_iter().enumerate() {
            let server = &self.servers[i].spec.name;
            if !self.policy.mcp_listed(server, "resources/read") {
                continue;
            }
            for r in list.unwrap_or_default() {
                owners.entry(r.uri.clone()).or_insert(i);
                out.push(r);
            }
        }
        *self.resources.lock().unwrap_or_else(|e| e.into_inner()) = owners;
        out
    }

    /// `resources/read`, decided as the tool `resources/read` with `uri`.
    pub async fn read_resource(
        &self,
        params: ReadResourceRequestParams,
        ct: &tokio_util::sync::CancellationToken,
    ) -> Result<ReadResourceResult, ErrorData> {
        let owner = |g: &Gateway| {
            g.resources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&params.uri)
                .copied()
        };
        let index = match owner(self) {
            Some(i) => i,
            None => {
                self.list_resources().await;
                owner(self).ok_or_else(|| {
                    ErrorData::resource_not_found(
                        format!("no resource {}: call `resources/list`", params.uri),
                        None,
                    )
                })?
            }
        };
        let up = &self.servers[index];
        let mut args = JsonObject::new();
        args.insert("uri".into(), Value::String(params.uri.clone()));
        self.admit("read", up, "resources/read", &mut args, None)?;
        let started = Instant::now();
        let outcome = self
            .upstream(index, Some(ct), |c| async move {
                c.peer().read_resource(params).await
            })
            .await;
        self.finish("read", up, "resources/read", started, outcome)
    }

    /// `prompts/list`: every server's prompts, named `server__prompt`.
    pub async fn list_prompts(&self) -> Vec<Prompt> {
        let lists = futures::future::join_all((0..self.servers.len()).map(|i| {
            self.upstream(
                i,
                None,
                |c| async move { c.peer().list_all_prompts().await },
            )
        }))
        .await;
        let mut out = Vec::new();
        for (up, list) in self.servers.iter().zip(lists) {
            if !self.policy.mcp_listed(&up.spec.name, "prompts/get") {
                continue;
            }
            for mut p in list.unwrap_or_default() {
                p.name = names::exposed(&up.spec.name, &p.name);
                out.push(p);
            }
        }
        out
    }

    /// `prompts/get`, decided as the tool `prompts/get` with `name` and the
    /// prompt's arguments.
    pub async fn get_prompt(
        &self,
        mut params: GetPromptRequestParams,
        ct: &tokio_util::sync::CancellationToken,
    ) -> Result<GetPromptResult, ErrorData> {
        let full = params.name.clone();
        let unknown =
            || ErrorData::invalid_params(format!("no prompt `{full}`: call `prompts/list`"), None);
        let (server, prompt) = names::split(&full).ok_or_else(unknown)?;
        let (index, up) = self.server(server).ok_or_else(unknown)?;
        let mut args = JsonObject::new();
        args.insert("name".into(), Value::String(prompt.to_string()));
        for (k, v) in params.arguments.iter().flatten() {
            args.insert(k.clone(), v.clone());
        }
        self.admit("get", up, "prompts/get", &mut args, None)?;
        params.name = prompt.to_string();
        let started = Instant::now();
        let outcome = self
            .upstream(index, Some(ct), |c| async move {
                c.peer().get_prompt(params).await
            })
            .await;
        self.finish("get", up, "prompts/get", started, outcome)
    }
}

/// Tells a server a call was abandoned (the agent cancelled it, or it
/// timed out) unless disarmed: dropping the call's future drops it here.
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    id: Option<RequestId>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let peer = self.peer.clone();
            tokio::spawn(async move {
                let _ = peer
                    .notify_cancelled(CancelledNotificationParam::new(
                        Some(id),
                        Some("the agent cancelled it, or it took too long".into()),
                    ))
                    .await;
            });
        }
    }
}

/// One `tools/call` to a server; `started` learns the request's progress
/// token as soon as it is sent.
async fn call_upstream(
    peer: &Peer<RoleClient>,
    params: CallToolRequestParams,
    started: impl FnOnce(ProgressToken),
) -> Result<CallToolResult, rmcp::ServiceError> {
    let handle = peer
        .send_request_with_option(
            ClientRequest::CallToolRequest(CallToolRequest::new(params)),
            PeerRequestOptions::no_options(),
        )
        .await?;
    started(handle.progress_token.clone());
    let mut guard = CancelOnDrop {
        peer: peer.clone(),
        id: Some(handle.id.clone()),
    };
    let result = handle.await_response().await;
    guard.id = None;
    match result? {
        ServerResult::CallToolResult(r) => Ok(r),
        _ => Err(rmcp::ServiceError::UnexpectedResponse),
    }
}

/// The gateway as one connection's MCP server (the Streamable HTTP service
/// makes one per agent session).
#[derive(Clone)]
pub struct Handler(pub Arc<Gateway>);

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        let caps = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_resources()
            .enable_resources_list_changed()
            .enable_prompts()
            .enable_prompts_list_changed()
            .build();
        let mut info = ServerConfig::new(caps);
        info.server_info = Implementation::new("sbx", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "sbx's MCP gateway: the tools of every MCP server this session may use, named server__tool. Every call is checked by the session's policy and recorded.".into(),
        );
        info
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.0
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(context.peer.clone());
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.0.tools().await))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let progress = context
            .meta
            .get_progress_token()
            .map(|t| (context.peer.clone(), t));
        self.0
            .call_with_progress(
                &request.name,
                request.arguments,
                Some(&context.ct),
                progress,
            )
            .await
            .map(CallToolResponse::Complete)
    }

    async fn list_resources(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(
            self.0.list_resources().await,
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.0
            .read_resource(request, &context.ct)
            .await
            .map(ReadResourceResponse::Complete)
    }

    async fn list_prompts(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(
            self.0.list_prompts().await,
        ))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        self.0
            .get_prompt(request, &context.ct)
            .await
            .map(GetPromptResponse::Complete)
    }
}
