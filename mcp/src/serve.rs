//! Serving the gateway: Streamable HTTP (rmcp's service) on every stream
//! the session hands over, the guest's (over vsock) and the host's (a Unix
//! socket in the session directory). Only the host's socket also answers
//! the `/sbx/...` requests `sbx mcp` makes (servers, tools, approve, call).
//!
//! Every connection is its own task on a small runtime: a connection that
//! sends garbage, too much, or nothing at all ties up only itself.

use std::convert::Infallible;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{json, Value};

use crate::gateway::{Gateway, Handler};

/// Largest request the gateway reads: generous for tool arguments, small
/// enough that a flood cannot exhaust the host.
pub const MAX_REQUEST: usize = 4 << 20;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The gateway's runtime and its HTTP service.
pub struct Server {
    rt: tokio::runtime::Runtime,
    mcp: StreamableHttpService<Handler, LocalSessionManager>,
    gateway: Arc<Gateway>,
}

impl Server {
    pub fn new(gateway: Arc<Gateway>) -> std::io::Result<Arc<Server>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mcp-gateway")
            .on_thread_start(|| {
                // A gateway thread must not run unconfined: without its
                // filter the session ends here (panics abort).
                if let Err(e) = sbx_seccomp::enter(sbx_seccomp::Kind::Mcp) {
                    panic!("{e}");
                }
            })
            .enable_all()
            .build()?;
        let g = gateway.clone();
        let config = StreamableHttpServerConfig::default()
            .with_max_request_body_bytes(MAX_REQUEST)
            .with_sse_keep_alive(Some(Duration::from_secs(15)));
        let mcp = StreamableHttpService::new(
            move || Ok(Handler(g.clone())),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        Ok(Arc::new(Server { rt, mcp, gateway }))
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves each stream `conns` yields (the guest's, over vsock).
    pub fn serve_guest(
        self: &Arc<Self>,
        conns: impl Iterator<Item = UnixStream> + Send + 'static,
    ) -> std::io::Result<()> {
        let me = self.clone();
        sbx_seccomp::spawn("mcp-accept", sbx_seccomp::Kind::Mcp, move || {
            for c in conns {
                me.serve_one(c, false);
            }
        })
        .map(drop)
    }

    /// Serves the host's socket (`sbx mcp`), admin requests included.
    pub fn serve_host(self: &Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        let me = self.clone();
        sbx_seccomp::spawn("mcp-host-accept", sbx_seccomp::Kind::Mcp, move || {
            for c in listener.incoming().flatten() {
                me.serve_one(c, true);
            }
        })
        .map(drop)
    }

    fn serve_one(self: &Arc<Self>, conn: UnixStream, admin: bool) {
        if conn.set_nonblocking(true).is_err() {
            return;
        }
        let me = self.clone();
        let _guard = self.rt.enter();
        let Ok(stream) = tokio::net::UnixStream::from_std(conn) else {
            return;
        };
        self.rt.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let me = me.clone();
                async move { Ok::<_, Infallible>(me.route(req, admin).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                tracing::debug!("MCP connection ended: {e}");
            }
        });
    }

    async fn route(&self, req: Request<Incoming>, admin: bool) -> Response<Body> {
        // Refused before a byte of the body is read: a client that waits
        // for `100 Continue` gets the refusal instead.
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST) {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": format!("requests are limited to {MAX_REQUEST} bytes") }),
            );
        }
        if admin && req.uri().path().starts_with("/sbx/") {
            return self.admin(req).await;
        }
        use tower_service::Service;
        let mut mcp = self.mcp.clone();
        match mcp.call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// `sbx mcp`'s requests: `GET /sbx/servers`, `GET /sbx/tools`,
    /// `POST /sbx/approve {server, tool?}`, `POST /sbx/call {name, arguments}`.
    async fn admin(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let bytes = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
        };
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
            }
        };
        let g = &self.gateway;
        match path.as_str() {
            "/sbx/servers" => reply(StatusCode::OK, json!(g.server_states())),
            "/sbx/tools" => reply(StatusCode::OK, json!(g.tool_states().await)),
            "/sbx/approve" => {
                let server = body["server"].as_str().unwrap_or_default();
                match g.approve(server, body["tool"].as_str()) {
                    Ok(tools) => reply(StatusCode::OK, json!({ "approved": tools })),
                    Err(e) => reply(StatusCode::BAD_REQUEST, json!({ "error": e })),
                }
            }
            "/sbx/call" => {
                let name = body["name"].as_str().unwrap_or_default();
                let args = body["arguments"].as_object().cloned();
                match g.call(name, args, None).await {
                    Ok(r) => reply(StatusCode::OK, json!({ "result": r })),
                    Err(e) => reply(StatusCode::OK, json!({ "error": e })),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({ "error": format!("no {path}") }),
            ),
        }
    }
}

fn reply(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
