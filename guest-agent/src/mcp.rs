//! The MCP gateway as guest programs see it: a relay on 127.0.0.1 to the
//! host's gateway (nothing else in the guest can reach an MCP server), the
//! stdio bridge for agents that only start stdio servers, and the common
//! agents' settings pointing at it, for root and every login user.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use sbx_protocol::mcp::{url, BRIDGE, GUEST_PORT, HOST_PORT, SERVER_NAME};
use serde_json::{json, Value};

use crate::relay;

/// Sets the gateway up when the host asked for it (`sbx.mcp`); returns
/// whether it did.
pub fn start(asked: bool) -> bool {
    if !asked {
        return false;
    }
    install_bridge();
    for user in users() {
        configure_agents(&user);
    }
    relay::serve(GUEST_PORT, HOST_PORT, "MCP gateway")
}

/// The bridge is this binary under another name, on the guest's /run.
fn install_bridge() {
    let done = Path::new(BRIDGE)
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::copy("/proc/self/exe", BRIDGE))
        .and_then(|_| std::fs::set_permissions(BRIDGE, std::fs::Permissions::from_mode(0o755)));
    if let Err(e) = done {
        eprintln!("sbx-guest-agent: cannot install {BRIDGE}: {e}");
    }
}

struct User {
    uid: u32,
    gid: u32,
    home: String,
}

/// root and the login users (uid 1000 and up) with a home directory.
fn users() -> Vec<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            let home = f.get(5)?.to_string();
            let login = uid == 0 || (1000..65534).contains(&uid);
            (login && Path::new(&home).is_dir()).then_some(User { uid, gid, home })
        })
        .collect()
}

/// Merges `{"mcpServers": {"sbx": server}}` into a JSON settings file,
/// leaving everything else in it as it was.
fn merge_json(path: &Path, server: Value, user: &User) {
    let mut doc: Value = match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                eprintln!(
                    "sbx-guest-agent: {} is not a JSON object; not adding the MCP gateway",
                    path.display()
                );
                return;
            }
        },
        Err(_) => json!({}),
    };
    doc["mcpServers"][SERVER_NAME] = server;
    write_owned(path, &format!("{doc:#}\n"), user);
}

fn write_owned(path: &Path, text: &str, user: &User) {
    if let Some(dir) = path.parent() {
        if !dir.exists() && std::fs::create_dir_all(dir).is_ok() {
            let _ = chown(dir, Some(user.uid), Some(user.gid));
        }
    }
    match std::fs::write(path, text) {
        Ok(()) => {
            let _ = chown(path, Some(user.uid), Some(user.gid));
        }
        Err(e) => eprintln!("sbx-guest-agent: cannot write {}: {e}", path.display()),
    }
}

/// Claude Code (`~/.claude.json`), Gemini CLI (`~/.gemini/settings.json`)
/// and Codex (`~/.codex/config.toml`) find the gateway without being told.
fn configure_agents(user: &User) {
    let home = Path::new(&user.home);
    merge_json(
        &home.join(".claude.json"),
        json!({ "type": "http", "url": url() }),
        user,
    );
    merge_json(
        &home.join(".gemini/settings.json"),
        json!({ "httpUrl": url() }),
        user,
    );
    let codex = home.join(".codex/config.toml");
    let have = std::fs::read_to_string(&codex).unwrap_or_default();
    let table = format!("[mcp_servers.{SERVER_NAME}]");
    if !have.contains(&table) {
        let mut text = have;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("\n{table}\nurl = \"{}\"\n", url()));
        write_owned(&codex, &text, user);
    }
}
