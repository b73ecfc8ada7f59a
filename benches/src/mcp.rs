//! The MCP gateway's cost, on the host: the time it adds to one
//! `tools/call` (policy, rate limit, pin, secret and credential scans, two
//! audit records) against calling the same server directly, and the calls
//! per second one session's gateway serves over Streamable HTTP.
//! Target: under 1 ms added per call at the median.
//!
//! The upstream is an in-process MCP server (rmcp) on OS pipes, as a stdio
//! server's are, so the numbers are the gateway's, not a VM's or Python's.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use sbx_audit::{AuditLog, Identity};
use sbx_mcp::{
    Gateway, Launcher, OnCredential, Options, Pins, Pipes, Server, ServerSpec, StdioServer,
    Transport,
};
use sbx_policy::PolicyBuilder;
use serde_json::json;

mod stats;

#[derive(Parser)]
#[command(about = "Time the MCP gateway adds to a tool call, and its calls per second")]
struct Args {
    /// Calls per latency measurement.
    #[arg(long, default_value_t = 3000)]
    calls: usize,
    /// Bytes of text in each call's arguments (scanned both ways).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Concurrent HTTP clients for the throughput run.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

/// One tool, `echo`, that returns its text.
#[derive(Clone)]
struct Echo;

impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = serde_json::from_value(json!({"type": "object"})).unwrap();
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "echo",
            "Echoes its text.",
            Arc::new(schema),
        )]))
    }

    async fn call_tool(
        &self,
        r: CallToolRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let t = r
            .arguments
            .and_then(|a| a.get("text").and_then(|t| t.as_str().map(str::to_string)))
            .unwrap_or_default();
        Ok(CallToolResponse::Complete(CallToolResult::success(vec![
            ContentBlock::text(t),
        ])))
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors, which we own from here on.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

/// Starts an `Echo` server on fresh pipes; returns the client's ends.
fn echo_server(rt: &tokio::runtime::Handle) -> Pipes {
    let (to_r, to_w) = pipe();
    let (from_r, from_w) = pipe();
    rt.spawn(async move {
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(to_r).unwrap();
        let tx = tokio::net::unix::pipe::Sender::from_owned_fd(from_w).unwrap();
        if let Ok(s) = Echo.serve((rx, tx)).await {
            let _ = s.waiting().await;
        }
    });
    Pipes {
        to_server: to_w,
        from_server: from_r,
    }
}

struct InProcess(tokio::runtime::Handle);

impl Launcher for InProcess {
    fn open(&self, _: &ServerSpec, _: &StdioServer) -> Result<Pipes, String> {
        Ok(echo_server(&self.0))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut b = PolicyBuilder::new();
    b.add_text(
        "bench.toml",
        "[[mcp]]\nid = \"bench\"\naction = \"allow\"\nserver = \"bench\"\ntools = [\"echo\"]\nargs.text = { regex = \"[a-z ]*\" }\n",
    )?;
    let log = Arc::new(AuditLog::open(
        &dir.path().join("audit.jsonl"),
        Identity::current("bench"),
        Duration::from_secs(1),
    )?);
    let secrets: Vec<(String, String)> = (0..5)
        .map(|i| {
            (
                format!("SECRET_{i}"),
                format!("secret-value-{i}-3f9a8b7c6d5e"),
            )
        })
        .collect();
    let spec = ServerSpec {
        name: "bench".into(),
        transport: Transport::Stdio(StdioServer {
            command: vec!["echo".into()],
            image: None,
            policy: vec![],
            mounts: vec![],
            env: vec![],
            user: None,
            cwd: None,
            mem_mib: 0,
        }),
        timeout_secs: 30,
        on_credential: OnCredential::Redact,
        declared: "bench".into(),
    };
    let gateway = Gateway::new(Options {
        servers: vec![spec],
        policy: Arc::new(b.build()?),
        log: log.clone(),
        pins: Pins::at(dir.path().join("pins.json")),
        secrets,
        bearers: Default::default(),
        launcher: Arc::new(InProcess(rt.handle().clone())),
    });
    let text = "lorem ipsum ".repeat(args.payload / 12 + 1)[..args.payload].to_string();
    let arguments = json!({ "text": text }).as_object().cloned();

    // Direct: a client on pipes to the same kind of server.
    let direct: Vec<f64> = rt.block_on(async {
        let p = echo_server(rt.handle());
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(p.from_server).unwrap();
        let tx = tokio::net::unix::pipe::Sender::from_owned_fd(p.to_server).unwrap();
        let client = ().serve((rx, tx)).await.expect("client");
        let mut v = Vec::with_capacity(args.calls);
        for _ in 0..args.calls + 100 {
            let params =
                CallToolRequestParams::new("echo").with_arguments(arguments.clone().unwrap());
            let t = Instant::now();
            client.peer().call_tool(params).await.expect("direct call");
            v.push(ms(t.elapsed()));
        }
        v.split_off(100)
    });
    // Through the gateway: every check, both records.
    let through: Vec<f64> = rt.block_on(async {
        let mut v = Vec::with_capacity(args.calls);
        for _ in 0..args.calls + 100 {
            let t = Instant::now();
            gateway
                .call("bench__echo", arguments.clone(), None)
                .await
                .expect("gateway call");
            v.push(ms(t.elapsed()));
        }
        v.split_off(100)
    });
    println!(
        "tools/call, {} calls, {} B of arguments, 5 session secrets scanned for",
        args.calls, args.payload
    );
    println!("{:<26} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms");
    for (name, v) in [
        ("server directly", &direct),
        ("through the gateway", &through),
    ] {
        println!(
            "{name:<26} {:>9} {:>9} {:>9}",
            stats::cell(v, 50.0),
            stats::cell(v, 90.0),
            stats::cell(v, 99.0)
        );
    }
    let p50 = |v: &[f64]| stats::percentile(v, 50.0).unwrap_or(0.0);
    let added = p50(&through) - p50(&direct);
    println!(
        "added by the gateway at p50: {added:.3} ms (target < 1 ms): {}; ratio {:.2}x",
        if added < 1.0 { "met" } else { "MISSED" },
        p50(&through) / p50(&direct).max(1e-9)
    );

    // Calls per second over Streamable HTTP: one MCP session per client,
    // each calling as fast as it is answered.
    let server = Server::new(gateway)?;
    let sock = dir.path().join("mcp.sock");
    server.serve_host(std::os::unix::net::UnixListener::bind(&sock)?)?;
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let threads: Vec<_> = (0..args.clients)
        .map(|_| {
            let (sock, done, text) = (sock.clone(), done.clone(), text.clone());
            std::thread::spawn(move || {
                let sid = http::initialize(&sock);
                let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "bench__echo", "arguments": {"text": text}}})
                .to_string();
                while Instant::now() < deadline {
                    let answer = http::post(&sock, Some(&sid), &body);
                    assert!(answer.contains("lorem"), "{answer}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "Streamable HTTP, {} clients, a connection per call: {:.0} calls/s ({n} calls in {} s)",
        args.clients,
        n as f64 / args.seconds as f64,
        args.seconds
    );
    log.sync()?;
    Ok(())
}

mod http {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    fn request(sock: &Path, sid: Option<&str>, body: &str) -> String {
        let mut s = UnixStream::connect(sock).expect("gateway socket");
        let mut head = String::from("POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\n");
        if let Some(sid) = sid {
            head.push_str(&format!(
                "Mcp-Session-Id: {sid}\r\nMCP-Protocol-Version: 2025-06-18\r\n"
            ));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    pub fn initialize(sock: &Path) -> String {
        let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}"#;
        let answer = request(sock, None, init);
        let sid = answer
            .lines()
            .find_map(|l| l.strip_prefix("mcp-session-id: "))
            .expect("a session id")
            .trim()
            .to_string();
        request(
            sock,
            Some(&sid),
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        );
        sid
    }

    pub fn post(sock: &Path, sid: Option<&str>, body: &str) -> String {
        request(sock, sid, body)
    }
}
