//! `sbx mcp`: a running session's MCP gateway from the host: its servers,
//! their tools and pin states, approving changed tools, and calling a tool
//! the way the agent would (the same policy, scanning and audit).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};
use sandbox::state::Dir;
use serde_json::{json, Value};

#[derive(clap::Args)]
#[command(
    after_help = "The servers come from `[[mcp.server]]` tables in ~/.config/sbx/mcp.toml \
and ./.sbx/mcp.toml (or `sbx start --mcp FILE`); which tools an agent may call is the policy's \
`[[mcp]]` rules (`sbx policy explain mcp SERVER.TOOL 'ARGS'`). Inside the session the gateway is \
$SBX_MCP_URL (http://127.0.0.1:7331/mcp); Claude Code, Codex and Gemini CLI are pointed at it."
)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Which {
    /// The session (default: the only running session with MCP servers).
    #[arg(long, short)]
    session: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// The session's MCP servers: kind, running, tools, quarantined tools, last error.
    Ls(Which),
    /// Every server's tools: the name the agent sees, pin state (pinned,
    /// quarantined, denied by policy) and hash. Starts servers not yet started.
    Tools(Which),
    /// Accept a server's changed tools (all of them, or TOOL), after review.
    /// Without a running session, the pins are changed directly.
    Approve {
        server: String,
        tool: Option<String>,
        #[command(flatten)]
        which: Which,
    },
    /// Call a tool through the gateway as the agent would:
    /// `sbx mcp call files.read_file '{"path": "/srv/a.txt"}'`.
    Call {
        /// SERVER.TOOL (or SERVER__TOOL, as the agent sees it).
        name: String,
        /// The arguments, a JSON object.
        #[arg(default_value = "{}")]
        arguments: String,
        #[command(flatten)]
        which: Which,
    },
}

pub fn run(a: Args) -> anyhow::Result<u8> {
    match a.cmd {
        Cmd::Ls(w) => {
            let dir = session(&w, true)?.context("no session")?;
            let v = request(&dir, "GET", "/sbx/servers", &Value::Null)?;
            if w.json {
                println!("{v:#}");
                return Ok(0);
            }
            println!(
                "{:<16} {:<16} {:<8} {:<6} QUARANTINED / LAST ERROR",
                "SERVER", "KIND", "RUNNING", "TOOLS"
            );
            for s in v.as_array().into_iter().flatten() {
                let tools = s["tools"].as_u64().map_or("-".into(), |n| n.to_string());
                let q: Vec<&str> = s["quarantined"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let mut note = q.join(",");
                if let Some(e) = s["last_error"].as_str() {
                    note = format!("{note} {e}").trim().to_string();
                }
                println!(
                    "{:<16} {:<16} {:<8} {:<6} {note}",
                    s["name"].as_str().unwrap_or(""),
                    s["kind"].as_str().unwrap_or(""),
                    if s["running"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    tools
                );
            }
            Ok(0)
        }
        Cmd::Tools(w) => {
            let dir = session(&w, true)?.context("no session")?;
            let v = request(&dir, "GET", "/sbx/tools", &Value::Null)?;
            if w.json {
                println!("{v:#}");
                return Ok(0);
            }
            println!("{:<32} {:<12} HASH", "TOOL", "STATE");
            for t in v.as_array().into_iter().flatten() {
                let hash = t["hash"].as_str().unwrap_or("");
                println!(
                    "{:<32} {:<12} {}",
                    t["exposed"].as_str().unwrap_or(""),
                    t["state"].as_str().unwrap_or(""),
                    &hash[..hash.len().min(19)]
                );
                if let Some(old) = t["approved"].as_str() {
                    println!(
                        "{:<32} {:<12} approved was {}",
                        "",
                        "",
                        &old[..old.len().min(19)]
                    );
                }
            }
            Ok(0)
        }
        Cmd::Approve {
            server,
            tool,
            which,
        } => {
            let approved: Vec<String> = match session(&which, false)? {
                Some(dir) => {
                    let v = request(
                        &dir,
                        "POST",
                        "/sbx/approve",
                        &json!({ "server": server, "tool": tool }),
                    )?;
                    if let Some(e) = v["error"].as_str() {
                        bail!("{e}");
                    }
                    serde_json::from_value(v["approved"].clone()).unwrap_or_default()
                }
                None => sandbox::mcp::pins()
                    .approve(&server, tool.as_deref())?
                    .into_iter()
                    .map(|(t, _, _)| t)
                    .collect(),
            };
            if which.json {
                println!("{}", json!({ "approved": approved }));
            } else if approved.is_empty() {
                println!(
                    "nothing to approve: no changed tool of `{server}`{}",
                    tool.map(|t| format!(" named `{t}`")).unwrap_or_default()
                );
            } else {
                println!(
                    "approved {}",
                    approved
                        .iter()
                        .map(|t| format!("{server}.{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(0)
        }
        Cmd::Call {
            name,
            arguments,
            which,
        } => {
            let args: Value = serde_json::from_str(&arguments)
                .with_context(|| format!("the arguments {arguments:?} are not JSON"))?;
            if !args.is_object() {
                bail!("the arguments must be a JSON object, like '{{\"path\": \"/x\"}}'");
            }
            let dir = session(&which, true)?.context("no session")?;
            let v = request(
                &dir,
                "POST",
                "/sbx/call",
                &json!({ "name": name, "arguments": args }),
            )?;
            if which.json {
                println!("{v:#}");
            } else if let Some(e) = v.get("error") {
                eprintln!(
                    "sbx: {}",
                    e["message"].as_str().unwrap_or("the call failed")
                );
            } else {
                for c in v["result"]["content"].as_array().into_iter().flatten() {
                    match c["text"].as_str() {
                        Some(t) => println!("{t}"),
                        None => println!("{c}"),
                    }
                }
                if let Some(s) = v["result"].get("structuredContent") {
                    println!("{s:#}");
                }
            }
            Ok(
                if v.get("error").is_some() || v["result"]["isError"] == json!(true) {
                    1
                } else {
                    0
                },
            )
        }
    }
}

/// The session `w` names, or the only one with a gateway; `needed` says
/// whether having none is an error.
fn session(w: &Which, needed: bool) -> anyhow::Result<Option<Dir>> {
    if let Some(name) = &w.session {
        let dir = Dir::new(name)?;
        if !dir.mcp_path().exists() {
            bail!("session `{name}` has no MCP gateway running: start it with MCP servers (`sbx start --mcp FILE`, or .sbx/mcp.toml)");
        }
        return Ok(Some(dir));
    }
    let mut all = sandbox::mcp::sessions_with_gateway();
    match all.len() {
        1 => Ok(all.pop()),
        0 if !needed => Ok(None),
        0 => bail!("no running session has MCP servers: start one with `sbx start --mcp FILE` (or .sbx/mcp.toml)"),
        _ => bail!(
            "several sessions have MCP servers ({}): say which with --session",
            all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// One request to the session's gateway over its socket.
fn request(dir: &Dir, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let sock = dir.mcp_path();
    let mut s = UnixStream::connect(&sock).with_context(|| {
        format!(
            "cannot reach session `{}`'s MCP gateway at {}",
            dir.name,
            sock.display()
        )
    })?;
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .context("the MCP gateway did not answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .context("the MCP gateway's answer is not HTTP")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let v: Value = serde_json::from_str(payload)
        .with_context(|| format!("the MCP gateway answered {status} with {payload:?}"))?;
    Ok(v)
}
