//! The MCP servers a session's gateway serves, as the user declares them
//! (`[[mcp.server]]` in `.sbx/mcp.toml`, `~/.config/sbx/mcp.toml`, or a
//! file given with `--mcp`), checked with file:line errors before anything
//! starts. Which of their tools an agent may call is the policy's business,
//! not this file's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{McpError, Result};

/// Longest server name: names prefix every tool the agent sees.
const MAX_NAME: usize = 24;

/// What to do with a well-known credential (a private key, a cloud or
/// git-host token) found in a request or a result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCredential {
    /// Replace it with `[REDACTED:<kind>]` and let the rest through.
    #[default]
    Redact,
    /// Refuse the whole request or result.
    Refuse,
}

/// How the gateway reaches a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A stdio command run in a microVM of its own.
    Stdio(StdioServer),
    /// A Streamable HTTP server reached from the host.
    Remote(RemoteServer),
}

/// A stdio server's microVM: what it boots and what it may reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioServer {
    pub command: Vec<String>,
    /// An image (`sbx image ls`) or `template/NAME`; the initramfs if none.
    pub image: Option<String>,
    /// Policy files for the server's own VM (its network, its secrets);
    /// none means the locked-down preset: no network at all.
    pub policy: Vec<PathBuf>,
    /// Shares, `HOST:GUEST[:ro|rw]` with HOST absolute: nothing of the
    /// agent's is visible unless listed here.
    pub mounts: Vec<String>,
    pub env: Vec<(String, String)>,
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub mem_mib: u64,
}

/// A remote server and how the gateway authenticates to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteServer {
    pub url: String,
    /// Extra roots to trust for this server (a private CA), PEM.
    pub ca: Option<PathBuf>,
    /// The sbx secret sent as `Authorization: Bearer <secret>`.
    pub bearer_secret: Option<String>,
}

/// One upstream server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    pub name: String,
    pub transport: Transport,
    /// How long one request may take before the agent gets an error.
    pub timeout_secs: u64,
    pub on_credential: OnCredential,
    /// Where it was declared (`file:line`), for messages.
    pub declared: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    mcp: Option<RawMcp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcp {
    #[serde(default)]
    server: Vec<Spanned<RawServer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: String,
    command: Option<Vec<String>>,
    url: Option<String>,
    image: Option<String>,
    #[serde(default)]
    policy: Vec<String>,
    #[serde(default)]
    mounts: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    user: Option<String>,
    cwd: Option<String>,
    memory_mib: Option<u64>,
    ca: Option<String>,
    bearer_secret: Option<String>,
    timeout_secs: Option<u64>,
    on_credential: Option<OnCredential>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Whether `name` can name a server: lowercase letters, digits and `-`,
/// so `server__tool` splits one way only.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "server name `{name}` must be 1 to {MAX_NAME} lowercase letters, digits or `-`"
        ))
    }
}

/// A path in a config file: absolute, or relative to the file's directory.
fn beside(file: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads the servers `path` declares.
pub fn load(path: &Path) -> Result<Vec<ServerSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| McpError::Config {
        at: path.display().to_string(),
        message: format!("cannot read it: {e}"),
    })?;
    parse(path, &text)
}

/// Parses `text`, read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<ServerSpec>> {
    let at = |offset: usize| format!("{}:{}", path.display(), line_of(text, offset));
    let raw: RawFile = toml::from_str(text).map_err(|e| McpError::Config {
        at: e
            .span()
            .map_or_else(|| path.display().to_string(), |s| at(s.start)),
        message: e.message().to_string(),
    })?;
    let mut out: Vec<ServerSpec> = Vec::new();
    for s in raw.mcp.map(|m| m.server).unwrap_or_default() {
        let declared = at(s.span().start);
        let bad = |message: String| McpError::Config {
            at: declared.clone(),
            message,
        };
        let r = s.into_inner();
        check_name(&r.name).map_err(bad)?;
        if let Some(other) = out.iter().find(|o| o.name == r.name) {
            return Err(bad(format!(
                "server `{}` is declared twice (first at {})",
                r.name, other.declared
            )));
        }
        let transport = match (r.command, r.url) {
            (Some(command), None) => {
                if command.is_empty() {
                    return Err(bad("`command` is empty".into()));
                }
                if r.ca.is_some() || r.bearer_secret.is_some() {
                    return Err(bad(
                        "`ca` and `bearer_secret` are for remote servers (`url`); a stdio server's own secrets come from its `policy`".into(),
                    ));
                }
                for m in &r.mounts {
                    if !m.starts_with('/') {
                        return Err(bad(format!(
                            "mount `{m}`: write HOST:GUEST[:ro|rw] with an absolute HOST path"
                        )));
                    }
                }
                Transport::Stdio(StdioServer {
                    command,
                    image: r.image,
                    policy: r.policy.iter().map(|p| beside(path, p)).collect(),
                    mounts: r.mounts,
                    env: r.env.into_iter().collect(),
                    user: r.user,
                    cwd: r.cwd,
                    mem_mib: r.memory_mib.unwrap_or(512),
                })
            }
            (None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(bad(format!("`url` {url:?} must start with https:// or http://")));
                }
                if r.image.is_some() || !r.policy.is_empty() || !r.mounts.is_empty() {
                    return Err(bad(
                        "`image`, `policy` and `mounts` are for stdio servers (`command`)".into(),
                    ));
                }
                Transport::Remote(RemoteServer {
                    url,
                    ca: r.ca.as_deref().map(|c| beside(path, c)),
                    bearer_secret: r.bearer_secret,
                })
            }
            _ => {
                return Err(bad(
                    "a server needs exactly one of `command` (stdio, in its own microVM) or `url` (remote)".into(),
                ))
            }
        };
        out.push(ServerSpec {
            name: r.name,
            transport,
            timeout_secs: r.timeout_secs.unwrap_or(60).max(1),
            on_credential: r.on_credential.unwrap_or_default(),
            declared,
        });
    }
    Ok(out)
}

/// The servers of several files, in order; a name declared twice is an
/// error naming both places.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<ServerSpec>> {
    let mut out: Vec<ServerSpec> = Vec::new();
    for p in paths {
        for s in load(p)? {
            if let Some(other) = out.iter().find(|o| o.name == s.name) {
                return Err(McpError::Config {
                    at: s.declared.clone(),
                    message: format!(
                        "server `{}` is already declared at {}",
                        s.name, other.declared
                    ),
                });
            }
            out.push(s);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<ServerSpec>> {
        parse(Path::new("/p/.sbx/mcp.toml"), text)
    }

    #[test]
    fn both_kinds_parse_with_their_defaults() {
        let s = parse_str(
            r#"
[[mcp.server]]
name = "files"
command = ["python3", "/srv/files.py"]
image = "base"
policy = ["files-policy.toml"]

[[mcp.server]]
name = "tickets"
url = "https://127.0.0.1:8443/mcp"
ca = "/etc/ca.pem"
bearer_secret = "TICKETS"
on_credential = "refuse"
"#,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        let Transport::Stdio(st) = &s[0].transport else {
            panic!()
        };
        assert_eq!(st.policy, [PathBuf::from("/p/.sbx/files-policy.toml")]);
        assert_eq!(st.mem_mib, 512);
        assert_eq!(s[0].declared, "/p/.sbx/mcp.toml:2");
        assert_eq!(s[0].on_credential, OnCredential::Redact);
        assert_eq!(s[1].on_credential, OnCredential::Refuse);
        assert_eq!(s[1].timeout_secs, 60);
    }

    #[test]
    fn mistakes_name_the_line() {
        let e = parse_str("[[mcp.server]]\nname = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("mcp.toml:1"), "{e}");
        assert!(e.to_string().contains("exactly one of"), "{e}");
        let e = parse_str("\n[[mcp.server]]\nname = \"A_b\"\nurl = \"https://x\"\n").unwrap_err();
        assert!(e.to_string().contains(":2"), "{e}");
        let e = parse_str("[[mcp.server]]\nname = \"a\"\nurl = \"https://x\"\nimgae = \"b\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("imgae"), "{e}");
        let e = parse_str(
            "[[mcp.server]]\nname = \"a\"\nurl = \"https://x\"\n[[mcp.server]]\nname = \"a\"\nurl = \"https://y\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e =
            parse_str("[[mcp.server]]\nname = \"a\"\ncommand = [\"x\"]\nmounts = [\"rel:/x\"]\n")
                .unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }
}
